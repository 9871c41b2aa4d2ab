"""``python -m catalens.api``: the ``catalens`` command."""

import sys

from catalens.api.cli import main

sys.exit(main())
