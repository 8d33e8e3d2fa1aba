"""A plugin whose module takes seconds to import: a slow policy load, for the reload tests."""

from __future__ import annotations

import time

IMPORT_SECONDS = 4.0
time.sleep(IMPORT_SECONDS)


class SlowToLoad:
    """No hooks; only its import is slow."""
