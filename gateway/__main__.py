"""``python -m gateway`` runs the ``mailgate`` command."""

import sys

from gateway.cli import main

sys.exit(main())
