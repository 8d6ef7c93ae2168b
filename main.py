"""The contest driver: python main.py --mode MODE [flags]. Same command line as the `moebench` command."""

import sys

from moebench.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
