"""`python -m bigmodel`: the command line."""

import sys

from bigmodel.cli import main

sys.exit(main())
