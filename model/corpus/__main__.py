import sys

from refrain.model.corpus.cli import main

sys.exit(main())
