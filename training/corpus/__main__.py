import sys

from refrain.training.corpus.commands import main

sys.exit(main())
