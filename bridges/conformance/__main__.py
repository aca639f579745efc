"""``python -m bridges.conformance``: the ``metta-bridges conformance`` command, standalone."""

import sys

from bridges.conformance.cli import main

sys.exit(main())
