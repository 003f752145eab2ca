"""``python -m fxstream``: the same as the ``fxstream`` console script."""

import sys

from fxstream.cli import main

sys.exit(main())
