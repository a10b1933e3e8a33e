"""`python -m mptkit ...`: the same as the `mptkit` command."""

import sys

from mptkit.cli import main

sys.exit(main())
