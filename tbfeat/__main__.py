"""``python -m tbfeat``: the same as the ``tbfeat`` command."""

import sys

from .cli import main

sys.exit(main())
