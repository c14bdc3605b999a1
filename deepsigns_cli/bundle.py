"""The sealed key bundle (.dskey).

Layout: MAGIC | header length (4 bytes, big endian) | header (JSON) | nonce (12) | ciphertext.
The header is public (format, schemes, creation time, KDF parameters, key id) and is bound
to the ciphertext as AES-256-GCM associated data, so editing it breaks the seal. The
plaintext is a safetensors blob: every secret array as a tensor, every other secret as JSON
in its metadata. The key is derived from a passphrase with scrypt. Nothing secret is ever
written unencrypted; the SHA-256 of the sealed file is the owner's public commitment.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets as _secrets
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import BundleError
from .fileio import atomic_output, require_file

__all__ = ["Bundle", "open_bundle", "read_header", "write_bundle", "commitment", "BUNDLE_VERSION"]

MAGIC = b"DSKEY\x00\x01\n"
BUNDLE_VERSION = 1
_SCRYPT = {"name": "scrypt", "n": 2**15, "r": 8, "p": 1, "length": 32}
_MAX_SCRYPT_MEMORY = 2**28  # 256 MiB, 8x what _SCRYPT needs
_FIX = "check the passphrase (DEEPSIGNS_PASSPHRASE or --passphrase-file) and that the file is the one you sealed"


@dataclass
class Bundle:
    """Everything secret, by scheme: JSON-able params and numpy arrays."""

    schemes: dict[str, dict] = field(default_factory=dict)  # name -> {"params", "arrays"}
    info: dict = field(default_factory=dict)  # model facts and fingerprint (secret too)
    header: dict = field(default_factory=dict)  # public; filled when read or sealed

    def add(self, scheme: str, params: dict, arrays: dict[str, np.ndarray]) -> None:
        self.schemes[scheme] = {"params": params, "arrays": arrays}

    @property
    def key_id(self) -> str:
        return self.header.get("key_id", "")


def _derive(passphrase: str, kdf: dict) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    if not passphrase:
        raise BundleError("the passphrase is empty: set DEEPSIGNS_PASSPHRASE or --passphrase-file")
    # the header is read before the seal is checked: a tampered cost must not make us spend
    # minutes and gigabytes before the AEAD tag says "tampered" (ValueError: "damaged")
    n, r, p = kdf["n"], kdf["r"], kdf["p"]
    if (kdf.get("name") != "scrypt" or kdf.get("length") != 32
            or not all(type(v) is int and v >= 1 for v in (n, r, p))
            or p > 4 or 128 * r * n > _MAX_SCRYPT_MEMORY):
        raise ValueError(f"scrypt parameters out of range: {kdf}")
    salt = base64.b64decode(kdf["salt"])
    return Scrypt(salt=salt, length=kdf["length"], n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(
        passphrase.encode("utf-8")
    )


def _plaintext(bundle: Bundle) -> bytes:
    from safetensors.numpy import save

    tensors, params = {}, {}
    for scheme, body in bundle.schemes.items():
        params[scheme] = body["params"]
        for name, arr in body["arrays"].items():
            tensors[f"{scheme}/{name}"] = np.ascontiguousarray(arr)
    meta = {"params": json.dumps(params), "info": json.dumps(bundle.info)}
    return save(tensors, metadata=meta)


def _from_plaintext(blob: bytes, header: dict) -> Bundle:
    from safetensors.numpy import load

    tensors = load(blob)
    meta = _safetensors_metadata(blob)  # load() does not return the metadata
    bundle = Bundle(info=json.loads(meta["info"]), header=header)
    for scheme, params in json.loads(meta["params"]).items():
        prefix = f"{scheme}/"
        arrays = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        bundle.add(scheme, params, arrays)
    return bundle


def _safetensors_metadata(blob: bytes) -> dict:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {})


def seal(bundle: Bundle, passphrase: str) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    kdf = dict(_SCRYPT, salt=base64.b64encode(os.urandom(16)).decode())
    header = {
        "format": "deepsigns-keys",
        "version": BUNDLE_VERSION,
        "schemes": sorted(bundle.schemes),
        "created": bundle.header.get("created")
        or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kdf": kdf,
        "cipher": "AES-256-GCM",
        "key_id": bundle.header.get("key_id") or _secrets.token_hex(8),
    }
    head = json.dumps(header, sort_keys=True).encode()
    prefix = MAGIC + struct.pack(">I", len(head)) + head
    nonce = os.urandom(12)
    cipher = AESGCM(_derive(passphrase, kdf)).encrypt(nonce, _plaintext(bundle), prefix)
    bundle.header = header
    return prefix + nonce + cipher


def _header_complete(header: dict) -> bool:
    """Every public field that readers (inspect, open) rely on, with its type."""
    want = {"format": str, "schemes": list, "created": str, "kdf": dict, "cipher": str,
            "key_id": str}
    return header.get("format") == "deepsigns-keys" and all(
        isinstance(header.get(k), t) for k, t in want.items()
    )


def _split(data: bytes, path: Path) -> tuple[bytes, dict, bytes]:
    bad = f"{path} is not a deepsigns key bundle (or it is damaged): give the .dskey that keygen wrote"
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        raise BundleError(bad)
    (n,) = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])
    end = len(MAGIC) + 4 + n
    if end + 12 + 16 > len(data):
        raise BundleError(bad)
    try:
        header = json.loads(data[len(MAGIC) + 4 : end])
        if header.get("version") != BUNDLE_VERSION or not _header_complete(header):
            raise ValueError(header.get("version"))
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise BundleError(
            f"{path}: unreadable or unsupported bundle header (tampered, or a newer format): "
            "use the file keygen wrote, with this version of deepsigns"
        ) from None
    return data[:end], header, data[end:]


def read_header(path: str | Path) -> dict:
    path = require_file(path, "key bundle")
    _, header, _ = _split(path.read_bytes(), path)
    return header


def open_bundle(path: str | Path, passphrase: str) -> Bundle:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    path = require_file(path, "key bundle")
    prefix, header, body = _split(path.read_bytes(), path)
    try:
        key = _derive(passphrase, header["kdf"])
        plain = AESGCM(key).decrypt(body[:12], body[12:], prefix)
    except InvalidTag:
        raise BundleError(f"cannot open {path}: wrong passphrase or tampered bundle; {_FIX}") from None
    except (KeyError, TypeError, ValueError):
        raise BundleError(f"cannot open {path}: its KDF parameters are damaged; {_FIX}") from None
    return _from_plaintext(plain, header)


def write_bundle(bundle: Bundle, path: str | Path, passphrase: str, *, force: bool) -> None:
    blob = seal(bundle, passphrase)
    with atomic_output(path, force, mode=0o600) as tmp:  # sealed, but still the owner's only
        tmp.write_bytes(blob)


def commitment(path: str | Path) -> str:
    """SHA-256 of the sealed file: publish it at release time to date the claim."""
    return hashlib.sha256(require_file(path, "key bundle").read_bytes()).hexdigest()
