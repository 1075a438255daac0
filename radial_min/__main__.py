"""`python -m radial_min ...`: the same as the `radial-min` command (console.py)."""

import sys

from radial_min.console import main

sys.exit(main())
