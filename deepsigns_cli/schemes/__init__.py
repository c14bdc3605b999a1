"""Watermark schemes, registered by name; `get_scheme("hidden")` returns one."""

from __future__ import annotations

from .base import Scheme, get_scheme, list_schemes, register_scheme

__all__ = ["Scheme", "get_scheme", "list_schemes", "register_scheme", "SCHEME_NAMES"]

# names known without importing torch (for click.Choice); modules load on first use
SCHEME_NAMES = ("hidden", "output")
