"""Removal attacks, one module each (or one module for a family: the deployment wrappers).
The list of them is `deepsigns_cli.registry.ATTACKS`; a module defines `ATTACK`, an `Attack`
subclass, or `ATTACKS`, a dict of row name -> class."""

from __future__ import annotations

from .base import Attack, AttackContext

__all__ = ["Attack", "AttackContext"]
