"""`python -m pipeline_ir ...`: see cli.py."""

import sys

from pipeline_ir.cli import main

sys.exit(main())
