"""``python -m edgeproxy``: the same as the ``edgeproxy`` console script."""

import sys

from .cli import main

sys.exit(main())
