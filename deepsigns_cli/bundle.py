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
import re
import secrets as _secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import BundleError, InputError, one_line, shown
from .fileio import require_file, sha256_file
from .results import SchemeKeys

__all__ = ["Bundle", "open_bundle", "read_header", "write_bundle", "commitment", "BUNDLE_VERSION"]

MAGIC = b"DSKEY\x00\x01\n"
BUNDLE_VERSION = 1
_SCRYPT = {"name": "scrypt", "n": 2**15, "r": 8, "p": 1, "length": 32}
_MAX_SCRYPT_MEMORY = 2**28  # 256 MiB, 8x what _SCRYPT needs
_FIX = "check the passphrase (DEEPSIGNS_PASSPHRASE or --passphrase-file) and that the file is the one you sealed"


@dataclass
class Bundle:
    """Everything secret, by scheme: JSON-able params and numpy arrays."""

    schemes: dict[str, SchemeKeys] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # model facts and fingerprint (secret too)
    header: dict = field(default_factory=dict)  # public; filled when read or sealed

    def add(self, scheme: str, params: dict, arrays: dict[str, np.ndarray]) -> None:
        self.schemes[scheme] = SchemeKeys(scheme, params, arrays)

    def put(self, keys: SchemeKeys) -> None:
        self.schemes[keys.scheme] = keys

    @property
    def shapes(self) -> tuple[tuple[int, ...], int]:
        """(input shape, number of classes) of the model the keys were made for."""
        shape, classes = self.info.get("input_shape"), self.info.get("num_classes")
        if not (isinstance(shape, list) and 1 <= len(shape) <= 4
                and all(type(d) is int and d > 0 for d in shape)
                and type(classes) is int and classes >= 2):
            raise BundleError("the bundle's model facts are damaged (input shape, classes): use "
                              "the bundle that keygen and embed wrote")
        return tuple(shape), classes

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
    salt = base64.b64decode(kdf["salt"], validate=True)  # binascii.Error is a ValueError
    return Scrypt(salt=salt, length=kdf["length"], n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(
        passphrase.encode("utf-8")
    )


def _plaintext(bundle: Bundle) -> bytes:
    from safetensors.numpy import save

    tensors, params = {}, {}
    for scheme, keys in bundle.schemes.items():
        params[scheme] = keys.params
        for name, arr in keys.arrays.items():
            tensors[f"{scheme}/{name}"] = np.ascontiguousarray(arr)
    meta = {"params": json.dumps(params), "info": json.dumps(bundle.info)}
    return save(tensors, metadata=meta)


def _from_plaintext(blob: bytes, header: dict) -> Bundle:
    """The opened payload. It passed the AEAD check, so it is what keygen or embed sealed; it is
    still checked, so that a bug or a foreign payload is a BundleError, never a crash."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(blob)
        meta = _safetensors_metadata(blob)  # load() does not return the metadata
        info, schemes = json.loads(meta["info"]), json.loads(meta["params"])
        if not isinstance(info, dict) or not isinstance(schemes, dict):
            raise ValueError("info and params must be JSON objects")
        bundle = Bundle(info=info, header=header)
        for scheme, params in schemes.items():
            if not isinstance(params, dict):
                raise ValueError(f"the parameters of {scheme!r} are not a JSON object")
            prefix = f"{scheme}/"
            arrays = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            bundle.add(scheme, params, arrays)
    except (SafetensorError, KeyError, ValueError, TypeError, AttributeError, RecursionError,
            struct.error) as exc:
        raise BundleError(
            f"the bundle opened but its contents are unreadable ({one_line(exc, 120)}): it was not "
            "written by this version of deepsigns; use the .dskey that keygen wrote"
        ) from None
    return bundle


def _safetensors_metadata(blob: bytes) -> dict:
    """The metadata of a safetensors blob (ValueError, KeyError or struct.error when malformed)."""
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise ValueError("the payload's header runs past its end")
    meta = json.loads(blob[8 : 8 + n]).get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("the payload's metadata is not a map of strings")
    return meta


# the most a bundle seals: AES-GCM in `cryptography` encrypts at most 2**31 - 1 bytes at once
# (the arrays' own bytes, less room for the payload's header)
MAX_SEALED_ARRAYS = 2**31 - 1 - (16 << 20)


def check_sealable(size: int) -> None:
    """InputError when keys of `size` bytes of arrays are more than a bundle seals (keys of
    2048 x 2048 images had failed in the cipher: exit 3, "a bug")."""
    if size > MAX_SEALED_ARRAYS:
        raise InputError(f"the keys hold {size / 2**30:.1f} GiB of samples, more than the "
                         f"{MAX_SEALED_ARRAYS / 2**30:.1f} GiB a bundle seals: make keys on smaller inputs "
                         "(--image-size) or fewer of them (--bits, --key-size)")


def seal(bundle: Bundle, passphrase: str) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    check_sealable(sum(a.nbytes for keys in bundle.schemes.values() for a in keys.arrays.values()))
    kdf = dict(_SCRYPT, salt=base64.b64encode(os.urandom(16)).decode())
    plain = _plaintext(bundle)
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
        # what follows the header (nonce, ciphertext, tag): a file cut short or added to is
        # told apart from a wrong passphrase, and inspect shows no commitment of it
        "sealed_bytes": _NONCE + len(plain) + _TAG,
    }
    head = json.dumps(header, sort_keys=True).encode()
    prefix = MAGIC + struct.pack(">I", len(head)) + head
    nonce = os.urandom(_NONCE)
    cipher = AESGCM(_derive(passphrase, kdf)).encrypt(nonce, plain, prefix)
    bundle.header = header
    return prefix + nonce + cipher


_MAX_HEADER = 64 * 1024  # bytes: keygen writes about 400
_NONCE, _TAG = 12, 16  # AES-GCM's, in bytes
_KEY_ID = re.compile(r"[0-9a-f]{8,64}")
_SCHEME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def _header_problem(header) -> str | None:
    """What is wrong with a parsed public header (every field readers rely on, with its type
    and form), or None. inspect prints these fields: none may carry control characters."""
    if not isinstance(header, dict):
        return "not a JSON object"
    if header.get("format") != "deepsigns-keys":
        return "not a deepsigns-keys header"
    version = header.get("version")
    if type(version) is not int or version != BUNDLE_VERSION:
        return f"version {one_line(json.dumps(version), 20)} (this deepsigns reads version {BUNDLE_VERSION})"
    schemes = header.get("schemes")
    if (not isinstance(schemes, list) or not schemes
            or not all(isinstance(s, str) and _SCHEME.fullmatch(s) for s in schemes)):
        return "'schemes' is not a list of scheme names"
    for key in ("created", "updated"):
        if key == "updated" and key not in header:
            continue
        value = header.get(key)
        if not isinstance(value, str) or len(value) > 64 or not _is_timestamp(value):
            return f"'{key}' is not a timestamp"
    kdf = header.get("kdf")
    if not isinstance(kdf, dict):
        return "'kdf' is not a JSON object"
    if (not all(type(kdf.get(k)) is int for k in ("n", "r", "p", "length"))
            or not isinstance(kdf.get("name"), str) or not _is_base64(kdf.get("salt"))):
        # the costs themselves are checked by _derive, before any work
        return "its KDF parameters are damaged"
    if header.get("cipher") != "AES-256-GCM":
        return "'cipher' is not AES-256-GCM"
    if not isinstance(header.get("key_id"), str) or not _KEY_ID.fullmatch(header["key_id"]):
        return "'key_id' is not a hexadecimal key id"
    sealed = header.get("sealed_bytes", _NONCE + _TAG)  # (bundles before it have none)
    if type(sealed) is not int or sealed < _NONCE + _TAG:
        return "'sealed_bytes' is not a size"
    return None


def _is_base64(text) -> bool:
    if not isinstance(text, str) or not text:
        return False
    try:
        base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error
        return False
    return True


def _is_timestamp(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return text.isprintable()


def _header_complete(header: dict) -> bool:
    """Every public field that readers (inspect, open) rely on, with its type."""
    return _header_problem(header) is None


def _parse_header(data: bytes, path: Path) -> tuple[int, dict]:
    """(end of the header, header) from the first bytes of a bundle (at least the magic, the
    length and the header itself); BundleError for anything else."""
    where = shown(path)
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        raise BundleError(
            f"{where} is not a deepsigns key bundle (or it is damaged): give the .dskey that keygen wrote"
        )
    (n,) = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])
    end = len(MAGIC) + 4 + n
    problem = None
    if n > _MAX_HEADER:
        problem = f"its length field claims {n} bytes, more than {_MAX_HEADER}"
    elif end > len(data):
        problem = "the file ends inside it"
    else:
        try:
            header = json.loads(data[len(MAGIC) + 4 : end])
        except RecursionError:
            problem = "nested too deeply"
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            problem = f"not JSON: {one_line(exc, 60)}"
        else:
            problem = _header_problem(header)
    if problem:
        raise BundleError(
            f"{where}: unreadable or unsupported bundle header ({problem}; tampered, or a newer "
            "format): use the file keygen wrote, with this version of deepsigns"
        )
    return end, header


def _check_size(header: dict, end: int, size: int, path: Path) -> None:
    """BundleError unless the file's `size` is what its header (ending at `end`) says."""
    if end + _NONCE + _TAG > size:
        raise BundleError(
            f"{shown(path)} is not a deepsigns key bundle (or it is damaged: it ends before its "
            "sealed payload): give the .dskey that keygen wrote"
        )
    if "sealed_bytes" in header and end + header["sealed_bytes"] != size:
        raise BundleError(
            f"{shown(path)} is damaged: its header says {end + header['sealed_bytes']} bytes, the file has {size} "
            "(cut short or added to): give the .dskey that keygen wrote, copied whole"
        )


def _split(data: bytes, path: Path) -> tuple[bytes, dict, bytes]:
    end, header = _parse_header(data, path)
    _check_size(header, end, len(data), path)
    return data[:end], header, data[end:]


def read_header(path: str | Path) -> dict:
    """The public header, reading no more of the file than the header itself."""
    path = require_file(path, "key bundle")
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC) + 4)
            if len(head) == len(MAGIC) + 4 and head.startswith(MAGIC):
                (n,) = struct.unpack(">I", head[len(MAGIC):])
                head += fh.read(min(n, _MAX_HEADER + 1))
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise BundleError(f"cannot read {shown(path)} ({one_line(exc)}): check the file's permissions") from None
    end, header = _parse_header(head, path)
    _check_size(header, end, size, path)
    return header


def open_bundle(path: str | Path, passphrase: str) -> Bundle:
    return unlock(path, passphrase)()


def unlock(path: str | Path, passphrase: str) -> Callable[[], Bundle]:
    """Open the bundle in the background: the file and its public header are read and checked
    now (their errors raised here); the key derivation (scrypt, which releases the GIL) and the
    decryption run in a thread. The returned function waits for them and gives the bundle, or
    raises the BundleError they met. A caller does other work (loading a suspect) meanwhile.
    The function's `commitment` is that of the bytes read here, the ones it opens."""
    import threading

    path = require_file(path, "key bundle")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {shown(path)} ({one_line(exc)}): check the file's permissions") from None
    prefix, header, body = _split(data, path)
    outcome: list = []

    def work() -> None:
        try:
            outcome.append(_open(path, prefix, header, body, passphrase))
        except BaseException as exc:  # noqa: BLE001  (handed to the waiting caller)
            outcome.append(exc)

    thread = threading.Thread(target=work, name="deepsigns-unlock", daemon=True)
    thread.start()

    def wait() -> Bundle:
        thread.join()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    wait.commitment = hashlib.sha256(data).hexdigest()
    return wait


def _open(path: Path, prefix: bytes, header: dict, body: bytes, passphrase: str) -> Bundle:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    given = getattr(passphrase, "given", None)  # (`api.AsGiven`: also as it was given, line ending and all)
    tries = [passphrase] if given is None else [passphrase, given]
    for secret in tries:
        try:
            key = _derive(secret, header["kdf"])
            plain = AESGCM(key).decrypt(body[:_NONCE], body[_NONCE:], prefix)
        except InvalidTag:
            continue
        except (KeyError, TypeError, ValueError, OverflowError):
            raise BundleError(f"cannot open {shown(path)}: its KDF parameters are damaged; {_FIX}") from None
        return _from_plaintext(plain, header)
    raise BundleError(f"cannot open {shown(path)}: wrong passphrase or tampered bundle; {_FIX}")


BUNDLE_MODE = 0o600  # sealed, but still the owner's only


def write_bundle(bundle: Bundle, path: str | Path, passphrase: str) -> str:
    """Seal the bundle into `path` as it is (callers write a temporary file of
    fileio.Outputs, added with mode=BUNDLE_MODE, which renames it into place).
    Returns the commitment of what was written."""
    blob = seal(bundle, passphrase)
    Path(path).write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()


def commitment(path: str | Path) -> str:
    """SHA-256 of the sealed file: publish it at release time to date the claim."""
    return sha256_file(require_file(path, "key bundle"))
