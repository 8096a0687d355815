"""``python -m lib_trainer``: the headless trainer's command line (``lib_trainer.headless.cli``)."""

import sys

from lib_trainer.headless.cli import main

if __name__ == "__main__":
    sys.exit(main())
