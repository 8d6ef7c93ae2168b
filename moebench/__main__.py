"""python -m moebench: the same command line as main.py."""

import sys

from moebench.cli.main import main

sys.exit(main())
