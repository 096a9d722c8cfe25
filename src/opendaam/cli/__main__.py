"""``python -m opendaam.cli``: the same as the ``opendaam`` command."""

import sys

from opendaam.cli import main

sys.exit(main())
