"""``python -m evomerge.cli``: the same as the ``evomerge`` command."""

from __future__ import annotations

import sys

from evomerge.cli import main

sys.exit(main())
