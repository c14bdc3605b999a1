"""Removal attacks, one module each. The list of them is `deepsigns_cli.registry.ATTACKS`;
each module defines `ATTACK`, an `Attack` subclass."""

from __future__ import annotations

from .base import Attack, AttackContext

__all__ = ["Attack", "AttackContext"]
