"""Broken: it exits while it is imported, as a script adapted from the original's that parses its own command line
at import (argparse exits with SystemExit 2). The harness must say so on one line, not end with the module's exit."""

import sys

sys.exit(2)
