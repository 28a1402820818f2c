"""``python -m seg4diff_fast.bench ...``: the ``bench`` command without the package CLI."""
import sys

from .command import main

sys.exit(main())
