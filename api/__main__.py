"""``python -m catalens.api``: the ``catalens`` command."""

import sys

from catalens.api.cli import main

if __name__ == "__main__":
    sys.exit(main())
