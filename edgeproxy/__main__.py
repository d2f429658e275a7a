"""``python -m edgeproxy``: the same as the ``edgeproxy`` console script."""

import sys

from .boot import main

sys.exit(main())
