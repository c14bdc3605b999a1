"""A multi-bit signature as people give it: a message in UTF-8 bits, or random bits (torch-free:
`verify` reads signatures without torch)."""

from __future__ import annotations

import numpy as np

from ..errors import SchemeError

__all__ = ["message_to_bits", "bits_to_message", "check_message"]


def check_message(message: str | None) -> None:
    if message is not None and not message:
        raise SchemeError("--message is empty: give the owner's message, or leave it out for random --bits")


def message_to_bits(message: str) -> np.ndarray:
    try:
        raw = np.frombuffer(message.encode("utf-8"), dtype=np.uint8)
    except UnicodeEncodeError:
        raise SchemeError("--message is not valid text (it holds a lone surrogate): "
                          "give the message as UTF-8 text") from None
    return np.unpackbits(raw).astype(np.uint8)


def bits_to_message(bits: np.ndarray) -> str:
    return np.packbits(bits.astype(np.uint8)).tobytes().decode("utf-8", errors="replace")
