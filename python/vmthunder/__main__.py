"""`python -m vmthunder ...`: the `vmthunder` command (vmthunder.cli)."""

import sys

from .cli import main

sys.exit(main())
