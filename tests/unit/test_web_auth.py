"""The web GUI's account, tickets, CSRF tokens and HTTP Basic check (replq/web/auth.py), and the
password hashes behind them (replq/passwords.py): pure, with a clock the test turns."""

from __future__ import annotations

import base64

import pytest

from replq import passwords, settings
from replq.errors import ValidationError
from replq.web.api import free_job_id
from replq.web.auth import RENEW_AFTER, TICKET_LIFETIME, Account, Authority

HASH = passwords.hash_password("s3cret-pass")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_password_hashes_are_salted_and_verified() -> None:
    assert passwords.is_hash(HASH) and "s3cret-pass" not in HASH
    assert passwords.hash_password("s3cret-pass") != HASH  # a new salt each time
    assert passwords.verify_password("s3cret-pass", HASH)
    assert not passwords.verify_password("s3cret-pasS", HASH)
    assert not passwords.verify_password("s3cret-pass", "s3cret-pass")  # a clear text is no hash
    assert not passwords.verify_password("x", "scrypt:3:8:1:" + "00" * 16 + ":" + "00" * 32)  # N not a power of 2
    assert passwords.verify_password("\udcff surrogate", passwords.hash_password("\udcff surrogate"))


def test_web_password_setting_stores_the_hash() -> None:
    stored = settings.check_setting("web_password", "correct horse")
    assert passwords.is_hash(stored) and passwords.verify_password("correct horse", stored)
    assert settings.check_setting("web_password", stored) == stored  # a hash stays as it is
    assert settings.check_setting("web_password", "") is None  # unset
    with pytest.raises(ValidationError, match="web_password: at least 8 characters"):
        settings.check_setting("web_password", "short")
    with pytest.raises(ValidationError, match="web_user: 1-64 characters"):
        settings.check_setting("web_user", "a:b")


def test_login_ticket_and_csrf_token() -> None:
    clock = Clock()
    auth = Authority(lambda: Account("admin", HASH), clock=clock)
    assert auth.login("admin", "wrong") is None and auth.login("root", "s3cret-pass") is None
    session = auth.login("admin", "s3cret-pass")
    assert session is not None
    ticket = auth.ticket(session)
    assert auth.session(ticket) == session and "s3cret" not in ticket
    token = auth.csrf_token(session)
    assert auth.csrf_ok(session, token) and not auth.csrf_ok(session, None) and not auth.csrf_ok(session, "x" * 64)
    other = auth.login("admin", "s3cret-pass")
    assert other is not None and not auth.csrf_ok(other, token)  # bound to its session
    # Tampered, foreign or garbage tickets are nothing.
    flipped = ticket[:-1] + ("1" if ticket.endswith("0") else "0")  # the signature's last digit changed
    for bad in (ticket.replace("admin", "admix", 1), flipped, "", "a:b", ":::", "admin:x:y:z",
                ticket[:-1] + "é", ticket + "\udcff"):
        assert auth.session(bad) is None, bad
    assert not auth.csrf_ok(session, "é" * 64) and not auth.csrf_ok(session, "\ud800")
    assert auth.login("\ud800", "s3cret-pass") is None and auth.login("admin", "\ud800") is None
    assert Authority(lambda: Account("admin", HASH), clock=clock).session(ticket) is None  # another key
    # Renewed once RENEW_AFTER old (same session, same CSRF token); expired after TICKET_LIFETIME unused.
    assert auth.renewal(session) is None
    clock.now += RENEW_AFTER + 1
    renewed = auth.renewal(session)
    assert renewed is not None and renewed.sid == session.sid and auth.csrf_token(renewed) == token
    clock.now += TICKET_LIFETIME - RENEW_AFTER
    assert auth.session(ticket) is None and auth.session(auth.ticket(renewed)) == renewed


def test_a_changed_account_ends_sessions() -> None:
    account = [Account("admin", HASH)]
    auth = Authority(lambda: account[0])
    session = auth.login("admin", "s3cret-pass")
    assert session is not None
    ticket = auth.ticket(session)
    account[0] = Account("ops", HASH)
    assert auth.session(ticket) is None
    account[0] = None  # type: ignore[call-overload]
    assert auth.session(ticket) is None and auth.login("admin", "s3cret-pass") is None


def test_basic_credentials() -> None:
    account = [Account("admin", HASH)]
    auth = Authority(lambda: account[0])
    assert auth.basic(basic("admin", "s3cret-pass")) == "admin"
    assert auth.basic(basic("admin", "s3cret-pass")) == "admin"  # remembered: no second hash
    for bad in (basic("admin", "wrong"), basic("root", "s3cret-pass"), "Bearer abc", "Basic !!!",
                "Basic " + base64.b64encode(b"no-colon").decode(), "Basic " + base64.b64encode(b"\xff:x").decode()):
        assert auth.basic(bad) is None, bad
    # A new password: what was remembered for the old one no longer counts.
    account[0] = Account("admin", passwords.hash_password("another-pass"))
    assert auth.basic(basic("admin", "s3cret-pass")) is None
    assert auth.basic(basic("admin", "another-pass")) == "admin"


@pytest.mark.parametrize(("existing", "expected"), [
    ([], "100-0"), (["100-0"], "100-1"), (["100-1"], "100-0"), (["100-0", "100-1", "100-3"], "100-2"),
])
def test_free_job_id_is_the_lowest_free_number(existing: list[str], expected: str) -> None:
    assert free_job_id(100, existing) == expected
