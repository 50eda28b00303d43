"""python -m poelm ... is the same as the poelm command."""
import sys

from poelm.cli import main

sys.exit(main())
