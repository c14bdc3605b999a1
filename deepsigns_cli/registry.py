"""The one list of watermark schemes and attacks (timm's `_registry`, kept static).

Each row says everything the rest of the code needs to know about its entry: where its code
lives (imported only when used, so `--help` stays torch-free), whether `verify` can read it
from a model's outputs alone, where it comes in the embedding order, its default epochs, the
keygen options it takes, and which kind of result it reports (`results.RESULT_KINDS`). A new
scheme or attack is one module plus one row here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace

from .errors import InputError, one_line

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


TINY = 1e-30  # the smallest size other than 0 a float option takes (float32 holds down to about 1e-38)


@dataclass(frozen=True)
class Option:
    """A command-line option of a scheme or an attack (`--bits` -> key "bits")."""

    flag: str
    kind: str  # "int", "float", "str", "choice" (one of `choices`) or "flag" (on when given)
    help: str
    low: float | None = None  # inclusive bounds, checked by the CLI
    high: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def check(self, value):
        """The value, or InputError: of the option's kind, finite, within its bounds."""
        import math

        if self.kind == "flag":
            if not isinstance(value, bool):
                raise InputError(f"{self.flag} is a flag (on or off), got {one_line(repr(value), 80)}")
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise InputError(f"{self.flag} must be one of {', '.join(self.choices)}, "
                                 f"got {one_line(repr(value), 80)}")
            return value
        kinds = {"int": (int,), "float": (int, float), "str": (str,)}[self.kind]
        ok = isinstance(value, kinds) and not isinstance(value, bool)
        if ok and self.kind != "str":
            ok = math.isfinite(value) and (self.low is None or value >= self.low) \
                and (self.high is None or value <= self.high)
        if not ok:
            what = {"int": "a whole number", "float": "a number", "str": "text"}[self.kind]
            if self.low is not None and self.high is not None:
                what += f" from {self.low:g} to {self.high:g}"
            raise InputError(f"{self.flag} must be {what}, got {one_line(repr(value), 80)}")
        if self.kind == "float":
            if value != 0 and abs(value) < TINY:  # (0 in float32, where weights and scores live: 1e-50
                # built a graph that onnxruntime aborted on)
                raise InputError(f"{self.flag} {value!r} cannot be told from 0 in float32: give 0 or at least {TINY:g}")
            return float(value) + 0.0  # (-0.0 is 0)
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
    takes: str = "torch"  # what `run` gets: "torch" (a checkpoint's model) or "onnx" (a ModelProto)
    writes: tuple[str, ...] = ("checkpoint", "onnx")  # the kinds of --out it can write
    passphrase: bool = False  # it seals a bundle of its own (the attacker's)
    trains: bool = False  # it trains (AttackContext.training): it takes --batch-size, --workers, --precision


_BITS = Option("--bits", "int", "random signature of N bits (default 64; hidden: held at each target class).",
               1, 4096)
_MESSAGE = Option("--message", "str", "the owner's message as the signature (UTF-8 bits).")

SCHEMES: dict[str, SchemeEntry] = {
    "hidden": SchemeEntry(
        name="hidden",
        module="deepsigns_cli.schemes.hidden",
        summary="white-box: bits in the mean activation of a trigger set at a hidden layer",
        blackbox=False,
        order=0,
        # a cap: it stops once both readings give every bit (17-50 epochs on the digits MLP at
        # the defaults, 16 seeds; at a cap of 40, 2 of them stopped with lined-up bits wrong)
        default_epochs=100,
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
        options=(Option("--key-size", "int", "number of key inputs K (default 100).", 1, 1000),),
    ),
    "gradsigns": SchemeEntry(
        name="gradsigns",
        module="deepsigns_cli.schemes.gradsigns",
        summary="black-box, multi-bit: bits in the input gradient of the loss, read from scores alone",
        blackbox=True,
        order=2,
        default_epochs=40,  # a cap: it stops once every bit reads back (8-18 epochs)
        result="gradient",
        options=(
            _BITS,
            _MESSAGE,
            Option("--carriers", "int", "input coordinates that carry the signature (default 64).", 1, 1 << 24),
            Option("--target-class", "int", "the secret target class (default: drawn at random).", 0, 1 << 20),
        ),
    ),
}

DEFAULT_SCHEMES = ("hidden",)  # keygen's --scheme when none is given

_EPOCHS = Option("--epochs", "int", "epochs of training (default 30).", 1, 100000)
_LR = Option("--lr", "float", "learning rate (default: the rate the model's training ended with, "
             "from its checkpoint).", 1e-12, 10.0)
_OPTIMIZER = Option("--optimizer", "choice", "adam or sgd (momentum 0.9; default adam).",
                    choices=("adam", "sgd"))
_FRACTION = Option("--data-fraction", "float", "share of the training data the attacker has "
                   "(default 1).", 1e-6, 1.0)
_ROWS = "rows of the model's test set"

ATTACKS: dict[str, AttackEntry] = {
    "finetune": AttackEntry(
        name="finetune",
        module="deepsigns_cli.attacks.finetune",
        summary="fine-tune on the attacker's data (FTLL, FTAL, RTLL, RTAL)",
        options=(
            _EPOCHS, _LR, _OPTIMIZER,
            Option("--layers", "choice", "train the last layer only or all layers (default all).",
                   choices=("last", "all")),
            Option("--reinit-last", "flag", "re-initialise the last layer first (RTLL, RTAL)."),
            _FRACTION,
        ),
        trains=True,
    ),
    "prune": AttackEntry(
        name="prune",
        module="deepsigns_cli.attacks.prune",
        summary="zero the smallest-magnitude weights, then optionally fine-tune with the mask kept",
        options=(
            Option("--rate", "float", "share of the weights set to zero (default 0.5).", 0.0, 1.0),
            Option("--scope", "choice", "rank weights over all layers or within each (default global).",
                   choices=("global", "layer")),
            Option("--finetune-epochs", "int", "epochs of fine-tuning after pruning, the pruned "
                   "weights held at zero (default 0).", 0, 100000),
            *(replace(o, help=f"with --finetune-epochs: {o.help}") for o in (_LR, _OPTIMIZER, _FRACTION)),
        ),
        trains=True,
    ),
    "overwrite": AttackEntry(
        name="overwrite",
        module="deepsigns_cli.attacks.overwrite",
        summary="embed the attacker's own watermark with fresh secrets (our keygen and embed)",
        options=(
            Option("--attacker-keys", "str", "the attacker's bundle to write (.dskey, sealed with "
                   "the passphrase; required)."),
            Option("--scheme", "str", "the attacker's schemes, comma-separated (default: "
                   "hidden,output; the method and layer are public, the owner's keys are not)."),
            Option("--epochs", "int", "embedding epochs per scheme (default: each scheme's own).",
                   1, 100000),
            _LR,
        ),
        passphrase=True,
        trains=True,
    ),
    "quantize": AttackEntry(
        name="quantize",
        module="deepsigns_cli.attacks.quantize",
        summary="int8 through onnxruntime's quantization (--out .onnx) or k-bit weight rounding "
                "(--out .safetensors)",
        options=(Option("--bits", "int", "bits per weight for k-bit rounding (default 8; an .onnx "
                        "--out is int8).", 1, 16),
                 Option("--static", "flag", "8-bit (uint8) activations too, at ranges calibrated on the "
                        "attacker's training samples (onnxruntime's quantize_static, QOperator "
                        "format; .onnx --out only).")),
    ),
    "noise": AttackEntry(
        name="noise",
        module="deepsigns_cli.attacks.noise",
        summary="Gaussian noise on the weights, relative to each tensor's spread",
        options=(Option("--sigma", "float", "noise spread, relative to each weight tensor's "
                        "standard deviation (default 0.1).", 0.0, 10.0),),
    ),
    "permute": AttackEntry(
        name="permute",
        module="deepsigns_cli.attacks.permute",
        summary="shuffle and positively rescale hidden units: the same function, other weights",
        options=(Option("--scale", "float", "each unit is rescaled by a factor drawn log-uniformly "
                        "from [1/S, S] (default 4; 1 for none).", 1.0, 1000.0),),
    ),
    "distill": AttackEntry(
        name="distill",
        module="deepsigns_cli.attacks.distill",
        summary="train a fresh model on the victim's soft outputs over the attacker's data",
        options=(
            _EPOCHS, Option("--lr", "float", "learning rate (default 1e-3).", 1e-12, 10.0),
            Option("--student", "str", "the student's architecture, a zoo name or "
                   "package.module:factory (default: the victim's)."),
            Option("--temperature", "float", "softmax temperature of the victim's outputs "
                   "(default 1).", 0.01, 100.0),
            _FRACTION,
        ),
        trains=True,
    ),
    "round-scores": AttackEntry(
        name="round-scores",
        module="deepsigns_cli.attacks.wrappers",
        summary="deploy the model so that it answers with probabilities rounded to a few decimals",
        options=(Option("--decimals", "int", "decimals kept (default 2).", 0, 8),),
        takes="onnx", writes=("onnx",),
    ),
    "noise-scores": AttackEntry(
        name="noise-scores",
        module="deepsigns_cli.attacks.wrappers",
        summary="deploy the model so that Gaussian noise is added to every probability it answers",
        options=(Option("--sigma", "float", "noise spread added to each probability (default 0.01).",
                        0.0, 10.0),),
        takes="onnx", writes=("onnx",),
    ),
    "noise-inputs": AttackEntry(
        name="noise-inputs",
        module="deepsigns_cli.attacks.wrappers",
        summary="deploy the model behind Gaussian noise on every input it is given",
        options=(Option("--sigma", "float", "noise spread, relative to the inputs' standard "
                        f"deviation over the {_ROWS} (default 0.1).", 0.0, 10.0),),
        takes="onnx", writes=("onnx",),
    ),
    "label-only": AttackEntry(
        name="label-only",
        module="deepsigns_cli.attacks.wrappers",
        summary="deploy the model so that it answers with its top label only",
        takes="onnx", writes=("onnx",),
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
    """An instance of the attack's class: its module's `ATTACKS[name]` where one module serves
    several rows (a dict of name -> class), else its `ATTACK`."""
    module = importlib.import_module(attack_entry(name).module)
    classes = getattr(module, "ATTACKS", None)
    return (classes[name] if isinstance(classes, dict) else module.ATTACK)()
