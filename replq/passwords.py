"""Salted password hashes (scrypt), so the web GUI's password is never stored in clear text.

The form is `scrypt:N:r:p:SALT:HASH` (salt and hash in hex; no `$`, which shells, Compose and
unit files would expand). A value already in that form is taken as a hash, not as a password: a
restored configuration or an environment file may carry the hash instead of the password.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

N, R, P = 1 << 14, 8, 1  # 16 MiB and about 50 ms per hash: cheap for a login, dear for a guesser
DKLEN = 32
HASH_RE = re.compile(r"scrypt:([0-9]{1,8}):([0-9]{1,3}):([0-9]{1,3}):([0-9a-f]{16,128}):([0-9a-f]{64})")
MAX_MEM = 256 << 20


def is_hash(text: str) -> bool:
    return HASH_RE.fullmatch(text) is not None


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    data = password.encode("utf-8", "surrogatepass")
    return hashlib.scrypt(data, salt=salt, n=n, r=r, p=p, dklen=DKLEN, maxmem=MAX_MEM)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    return f"scrypt:{N}:{R}:{P}:{salt.hex()}:{_scrypt(password, salt, N, R, P).hex()}"


def verify_password(password: str, hashed: str) -> bool:
    """True if `password` is the one `hashed` was made from (constant time in the comparison)."""
    m = HASH_RE.fullmatch(hashed)
    if m is None:
        return False
    n, r, p = (int(m.group(i)) for i in (1, 2, 3))
    try:
        digest = _scrypt(password, bytes.fromhex(m.group(4)), n, r, p)
    except (ValueError, MemoryError):  # parameters no scrypt accepts: no password matches
        return False
    return hmac.compare_digest(digest, bytes.fromhex(m.group(5)))
