"""`python -m moba_rewrite.cli`: the `moba-rewrite` command."""

import sys

from moba_rewrite.cli import main

sys.exit(main())
