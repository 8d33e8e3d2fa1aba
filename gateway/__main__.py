"""``python -m mailgate`` runs the ``mailgate`` command."""

import sys

from mailgate.cli import main

sys.exit(main())
