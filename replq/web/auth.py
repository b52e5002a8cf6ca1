"""Who may use the web GUI and its API: one operator account, session tickets, CSRF tokens.

- The account (user + salted scrypt hash) comes from `replq web --basic-auth`, else
  REPLQ_WEB_USER/REPLQ_WEB_PASSWORD, else the cluster settings web_user/web_password, which are
  read at each login so that `replq settings set` takes effect without a restart.
- The login form gets a ticket in an HttpOnly, SameSite=Strict cookie (like Proxmox's
  PVEAuthCookie): `USER:SESSION:ISSUED:SIGNATURE`, an HMAC under a key this process draws at
  start, valid for TICKET_LIFETIME since its last use (renewed while the page is open).
- A change through a cookie session also needs the session's CSRF token in the header
  CSRFPreventionToken (as in Proxmox): another site can make the browser send the cookie,
  but cannot read the token.
- API clients send HTTP Basic credentials with each request instead; checked hashes are
  remembered for a minute, so a script polling the API does not pay scrypt every time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from replq.passwords import verify_password

COOKIE = "REPLQAuthCookie"
CSRF_HEADER = "CSRFPreventionToken"
TICKET_LIFETIME = 2 * 3600
RENEW_AFTER = 15 * 60
BASIC_CACHE_SECONDS = 60
BASIC_CACHE_SIZE = 64


# Each password check costs 16 MiB and ~50 ms (scrypt): at most two at a time, however many
# requests with credentials arrive at once.
_CHECKS = threading.BoundedSemaphore(2)


def _same(a: str, b: str) -> bool:
    """Constant-time comparison of two texts from the network (any characters)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class Account:
    user: str
    password_hash: str

    def check(self, user: str, password: str) -> bool:
        # Hash even for a wrong user name, so the answer takes as long either way.
        with _CHECKS:
            ok = verify_password(password, self.password_hash)
        return ok and _same(user, self.user)


@dataclass(frozen=True)
class Session:
    user: str
    sid: str
    issued: int


class Authority:
    """Checks logins, tickets, CSRF tokens and Basic credentials against the one account."""

    def __init__(self, account: Callable[[], Account | None], key: bytes | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._account = account
        self._key = key or secrets.token_bytes(32)
        self._clock = clock
        self._basic_ok: dict[bytes, float] = {}

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    # ---- login form and tickets --------------------------------------------------------------
    def login(self, user: str, password: str) -> Session | None:
        account = self._account()
        if account is None or not account.check(user, password):
            return None
        return Session(account.user, secrets.token_hex(16), int(self._clock()))

    def ticket(self, session: Session) -> str:
        body = f"{session.user}:{session.sid}:{session.issued}"
        return f"{body}:{self._sign('ticket:' + body)}"

    def renewal(self, session: Session) -> Session | None:
        """A fresh ticket's session once the ticket is RENEW_AFTER old (same session, same CSRF token)."""
        now = int(self._clock())
        return Session(session.user, session.sid, now) if now - session.issued > RENEW_AFTER else None

    def session(self, ticket: str) -> Session | None:
        """The session a cookie's ticket stands for, if it is ours, unexpired and its user still the account's."""
        body, _, signature = ticket.rpartition(":")
        parts = body.split(":")
        if len(parts) != 3 or not _same(signature, self._sign("ticket:" + body)):
            return None
        user, sid, issued = parts
        if not issued.isdigit() or self._clock() - int(issued) > TICKET_LIFETIME:
            return None
        account = self._account()
        if account is None or account.user != user:  # the account changed: log in again
            return None
        return Session(user, sid, int(issued))

    def csrf_token(self, session: Session) -> str:
        return self._sign(f"csrf:{session.user}:{session.sid}")

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return token is not None and _same(token, self.csrf_token(session))

    # ---- HTTP Basic --------------------------------------------------------------------------
    def basic(self, header: str) -> str | None:
        """The user of a valid `Authorization: Basic …` header, else None."""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, ValueError):
            return None
        if not sep:
            return None
        account = self._account()
        if account is None:
            return None
        now = self._clock()
        seen = hashlib.sha256(self._key + account.password_hash.encode() + b"\0"
                              + header.encode("utf-8", "surrogatepass")).digest()
        if self._basic_ok.get(seen, 0) > now:
            return account.user
        if not account.check(user, password):
            return None
        if len(self._basic_ok) >= BASIC_CACHE_SIZE:
            self._basic_ok = {k: t for k, t in self._basic_ok.items() if t > now}
            if len(self._basic_ok) >= BASIC_CACHE_SIZE:
                self._basic_ok.clear()
        self._basic_ok[seen] = now + BASIC_CACHE_SECONDS
        return account.user
