"""Helpers shared by the background-removal modules."""

from __future__ import annotations

__all__ = ["fill_info"]


def fill_info(info, **values) -> None:
    """Update the caller's ``info`` dict with ``values`` (nothing when it is None)."""
    if info is not None:
        info.update(values)
