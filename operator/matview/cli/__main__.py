"""``python -m matview.cli``."""

import sys

from matview.cli import main

sys.exit(main())
