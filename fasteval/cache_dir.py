"""Where fasteval keeps what it learns between runs (the demo, compiled artifacts and their profiles,
measured route rates, model facts): ``$FASTEVAL_CACHE``, default ``~/.cache/fasteval``."""

from __future__ import annotations

import os


def cache_base() -> str:
    """``$FASTEVAL_CACHE``, default ``~/.cache/fasteval``; read at each call, so a changed variable counts."""
    return os.environ.get("FASTEVAL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fasteval")
