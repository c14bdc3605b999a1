"""The one list of watermark schemes and attacks (timm's `_registry`, kept static).

Each row says everything the rest of the code needs to know about its entry: where its code
lives (imported only when used, so `--help` stays torch-free), whether `verify` can read it
from a model's outputs alone, where it comes in the embedding order, its default epochs, the
keygen options it takes, and which kind of result it reports (`results.RESULT_KINDS`). A new
scheme or attack is one module plus one row here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .errors import InputError

__all__ = [
    "Option",
    "SchemeEntry",
    "AttackEntry",
    "SCHEMES",
    "DEFAULT_SCHEMES",
    "ATTACKS",
    "scheme_entry",
    "scheme_names",
    "embed_order",
    "load_scheme",
    "attack_entry",
    "attack_names",
    "load_attack",
    "keygen_options",
]


@dataclass(frozen=True)
class Option:
    """A command-line option of a scheme or an attack (`--bits` -> key "bits")."""

    flag: str
    kind: str  # "int", "float" or "str"
    help: str
    low: float | None = None  # inclusive bounds, checked by the CLI
    high: float | None = None

    @property
    def key(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def check(self, value):
        """The value, or InputError: of the option's kind, finite, within its bounds."""
        import math

        kinds = {"int": (int,), "float": (int, float), "str": (str,)}[self.kind]
        ok = isinstance(value, kinds) and not isinstance(value, bool)
        if ok and self.kind != "str":
            ok = math.isfinite(value) and (self.low is None or value >= self.low) \
                and (self.high is None or value <= self.high)
        if not ok:
            what = {"int": "a whole number", "float": "a number", "str": "text"}[self.kind]
            if self.low is not None and self.high is not None:
                what += f" from {self.low:g} to {self.high:g}"
            raise InputError(f"{self.flag} must be {what}, got {value!r}")
        return value


@dataclass(frozen=True)
class SchemeEntry:
    name: str
    module: str  # holds one class decorated with nothing: `SCHEME = TheClass`
    summary: str
    blackbox: bool  # `verify` reads it from a model's outputs alone
    order: int  # embedding order: lower first (hidden before output, the paper's Fig. 2)
    default_epochs: int  # embed epochs (a cap where the scheme stops by itself)
    result: str  # "bits" or "matches": the result type, and so how it renders
    options: tuple[Option, ...] = ()


@dataclass(frozen=True)
class AttackEntry:
    name: str
    module: str
    summary: str
    options: tuple[Option, ...] = ()


_BITS = Option("--bits", "int", "random signature of N bits (default 64), held at each target class.", 1, 4096)
_MESSAGE = Option("--message", "str", "the owner's message as the signature (UTF-8 bits).")

SCHEMES: dict[str, SchemeEntry] = {
    "hidden": SchemeEntry(
        name="hidden",
        module="deepsigns_cli.schemes.hidden",
        summary="white-box: bits in the mean activation of a trigger set at a hidden layer",
        blackbox=False,
        order=0,
        default_epochs=10,
        result="bits",
        options=(
            _BITS,
            _MESSAGE,
            Option("--layer", "str", "carrier layer (default: input of the last linear layer)."),
            Option("--classes", "int", "number of secret target classes (default 3).", 1, 1000),
        ),
    ),
    "output": SchemeEntry(
        name="output",
        module="deepsigns_cli.schemes.output",
        summary="black-box: labels the model gives to random key inputs from rare regions",
        blackbox=True,
        order=1,
        default_epochs=200,
        result="matches",
        options=(Option("--key-size", "int", "number of key inputs K (default 20).", 1, 1000),),
    ),
}

DEFAULT_SCHEMES = ("hidden",)  # keygen's --scheme when none is given

ATTACKS: dict[str, AttackEntry] = {
    "noise": AttackEntry(
        name="noise",
        module="deepsigns_cli.attacks.noise",
        summary="Gaussian noise on the weights, relative to each tensor's spread",
        options=(Option("--sigma", "float", "noise spread, relative to each weight tensor's "
                        "standard deviation (default 0.1).", 0.0, 10.0),),
    ),
}


def scheme_names() -> list[str]:
    return list(SCHEMES)


def scheme_entry(name: str) -> SchemeEntry:
    if name not in SCHEMES:
        raise InputError(f"unknown scheme '{name}': use one of {', '.join(SCHEMES)} (comma-separated)")
    return SCHEMES[name]


def embed_order(names) -> list[str]:
    """Known schemes in embedding order."""
    return sorted(names, key=lambda n: scheme_entry(n).order)


def keygen_options() -> list[tuple[Option, list[str]]]:
    """Every keygen option once, with the schemes that take it (--bits serves several)."""
    seen: dict[str, tuple[Option, list[str]]] = {}
    for entry in SCHEMES.values():
        for option in entry.options:
            seen.setdefault(option.flag, (option, []))[1].append(entry.name)
    return list(seen.values())


def _load(module: str, attr: str):
    return getattr(importlib.import_module(module), attr)


def load_scheme(name: str):
    """An instance of the scheme's class (imports its module, and torch with it if it needs)."""
    return _load(scheme_entry(name).module, "SCHEME")()


def attack_names() -> list[str]:
    return list(ATTACKS)


def attack_entry(name: str) -> AttackEntry:
    if name not in ATTACKS:
        known = ", ".join(ATTACKS) or "none yet"
        raise InputError(f"unknown attack '{name}': use one of {known}")
    return ATTACKS[name]


def load_attack(name: str):
    return _load(attack_entry(name).module, "ATTACK")()
