"""`python -m ringsync`: the ringsync command."""

import sys

from ringsync.cli import main

sys.exit(main())
