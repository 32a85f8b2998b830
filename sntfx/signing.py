"""A local signing key, so that model files you wrote yourself are trusted on load.

A model file's recipe may name a Python file or module to rebuild the model
from (``file`` and ``import`` sources); importing it runs its code. sntfx
rebuilds such a file only when the user trusts it (see
:func:`sntfx.serialization.load`). Files written on this machine, by this
user, are trusted without asking: :func:`sntfx.save` signs each file's digest
with HMAC-SHA256 under a random 256-bit key kept in the user's configuration
folder (``$XDG_CONFIG_HOME/sntfx/signing-key``, else
``~/.config/sntfx/signing-key``, mode 0600, created on first save).

The trust rule does not depend on the file format being secret: anyone can
compute a file's digest, only the key's holder can sign it. A file from
elsewhere, or one whose key is gone, simply needs ``--trust-source`` (or
``--model-file``) again. The signature adds nothing else: weights are always
read with ``torch.load(weights_only=True)`` and checked against the digest.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

__all__ = ["key_path", "sign", "verify"]

log = logging.getLogger(__name__)

_KEY_BYTES = 32


def key_path() -> Path:
    """Where this user's signing key lives."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "sntfx" / "signing-key"


def _read_key(path: Path) -> bytes | None:
    try:
        key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
    return key if len(key) == _KEY_BYTES else None


def _key(create: bool) -> bytes | None:
    path = key_path()
    key = _read_key(path)
    if key is not None or not create:
        return key
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # secret: never wider than 0600
    except FileExistsError:  # another process created it first
        return _read_key(path)
    except OSError as exc:
        log.warning("cannot create the signing key %s (%s); files saved now are not signed", path, exc)
        return None
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secrets.token_hex(_KEY_BYTES) + "\n")
    return _read_key(path)


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"sntfx-key-id|" + key).hexdigest()[:16]


def sign(digest: str) -> dict[str, str] | None:
    """A signature of ``digest`` under this user's key (created if missing); None if no key can be had."""
    key = _key(create=True)
    if key is None:
        return None
    return {"key_id": _key_id(key), "hmac": hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()}


def verify(signature: object, digest: str) -> bool:
    """True if ``signature`` was made by this user's key over ``digest``."""
    if not isinstance(signature, dict):
        return False
    key = _key(create=False)
    mac = signature.get("hmac")
    if key is None or not isinstance(mac, str):
        return False
    expected = hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, mac)
