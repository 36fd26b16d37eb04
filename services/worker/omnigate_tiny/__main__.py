"""``python -m omnigate_tiny --out models [--family ...] [--force]``: what ``make models`` runs."""

import sys

from omnigate_tiny.build import main

sys.exit(main())
