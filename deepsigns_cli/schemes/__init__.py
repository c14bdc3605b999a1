"""Watermark schemes, registered by name; `get_scheme("hidden")` returns one."""

from __future__ import annotations

from .base import Scheme, get_scheme, list_schemes, register_scheme

__all__ = ["Scheme", "get_scheme", "list_schemes", "register_scheme", "SCHEME_NAMES", "BLACKBOX"]

# known without importing any scheme (click choices, verify's fast path): name -> black-box?
BLACKBOX = {"hidden": False, "output": True}
SCHEME_NAMES = tuple(BLACKBOX)
