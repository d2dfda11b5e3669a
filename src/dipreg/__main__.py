"""``python -m dipreg``: the same command line as the ``dipreg`` console script."""

import sys

from dipreg.cli import main

sys.exit(main())
