"""`python -m devsilo.cli`: the same as `silo`."""

import sys

from .main import main

sys.exit(main())
