"""``python -m attnc ...``: the ``attnc`` command, runnable from the source tree without installation."""

import sys

from attnc.cli import main

if __name__ == "__main__":
    sys.exit(main())
