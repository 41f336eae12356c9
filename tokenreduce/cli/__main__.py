"""``python -m tokenreduce.cli``: the ``tokenreduce`` command."""
import sys

from . import main

sys.exit(main())
