"""``python -m catalens.api.cli``: the ``catalens`` command."""

import sys

from catalens.api.cli import main

sys.exit(main())
