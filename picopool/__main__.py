"""``python -m picopool topology DSN [--watch [SECONDS]] [--json]``: see picopool._cli."""

import sys

from ._cli import main

sys.exit(main())
