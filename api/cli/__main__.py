"""``python -m catalens.api.cli``: the ``catalens`` command."""

import sys

from catalens.api.cli import main

if __name__ == "__main__":
    sys.exit(main())
