"""`python -m ldot COMMAND ...`: the same as the `ldot` command."""
import sys

from ldot.cli import main

sys.exit(main())
