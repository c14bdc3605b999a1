"""Defaults and bounds shared by the api, the CLI and the runtime (stdlib only: the CLI reads
them to build --help without importing anything heavy)."""

from __future__ import annotations

__all__ = ["DEFAULT_ALPHA", "DEFAULT_TIMEOUT", "LIMITS"]

# A forger can try many key sets: at 1e-9 (with the default 64 bits and 100 keys) one random
# key set claims a model it was never embedded in with probability at most 1e-9
DEFAULT_ALPHA = 1e-9
DEFAULT_TIMEOUT = 60.0  # seconds for all of one suspect model's evaluation

#: bounds of every size a user gives: a typo or a hostile value fails at once, never hangs
LIMITS = {
    "epochs": (1, 100_000),
    "batch_size": (1, 65_536),
    "seed": (0, 2**32 - 1),
    "lr": (1e-12, 10.0),  # (below, no step moves a float32 weight: 1e-320 ran as training)
    "timeout": (0.0, 86_400.0),  # exclusive of 0
    "queries": (1, 10_000_000),  # a black-box GradSigns reading's budget
    "image_size": (2, 2048),  # --image-size: pixels per side of an image folder's samples
}
PRECISIONS = ("fp32", "bf16", "fp16")  # --precision: fp32, or autocast (fp16 on CUDA only)
#: how long a process of a data-parallel run waits for the others, to meet (machines that start
#: late) and then at each collective step (torch's default)
RENDEZVOUS_SECONDS = 600.0
