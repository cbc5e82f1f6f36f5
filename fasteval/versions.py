"""Installed packages' versions, for reports and for the keys of what depends on them (the decoded cache)."""

from __future__ import annotations


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (``_`` and ``-`` spellings both tried), or None."""
    from importlib import metadata

    for candidate in (name, name.replace("_", "-")):
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None
