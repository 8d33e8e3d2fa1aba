"""The installed mailgate's version, from the package metadata (``pyproject.toml``)."""

from __future__ import annotations

import importlib.metadata

DISTRIBUTION = "mailgate"


def version() -> str:
    """The version of the installed ``mailgate`` distribution, or ``unknown`` if it is not one.

    Read with :mod:`importlib.metadata`, so it is the version pip installed
    (``pip install -e .`` included), never a copy kept in the code.
    """
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree never installed
        return "unknown"
