import sys

from model.corpus.cli import main

sys.exit(main())
