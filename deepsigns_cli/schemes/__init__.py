"""Watermark schemes. The list of them is `deepsigns_cli.registry.SCHEMES`; each module here
defines `SCHEME`, a `Scheme` subclass."""

from __future__ import annotations

from .base import Scheme, get_scheme

__all__ = ["Scheme", "get_scheme"]
