"""``python -m lmmjax.fit config.yaml``: the command line (see :mod:`lmmjax.cli`)."""

import sys

from lmmjax.cli import main

if __name__ == "__main__":
    sys.exit(main())
