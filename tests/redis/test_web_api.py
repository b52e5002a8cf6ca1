"""The web GUI's JSON API over real HTTP against a real redis-server: every endpoint, the 401s,
the login cookie and its CSRF token, HTTP Basic, and refusals in the CLI's own words."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replq.model import Job
from replq.passwords import hash_password, is_hash, verify_password
from replq.store import Store
from replq.web.auth import Account
from replq.web.server import make_app, settings_account
from tests.support.helpers import REPO, ok, refused_inproc, run, stop_procs, wait_for

USER, PASSWORD = "admin", "s3cret-pass"
HASH = hash_password(PASSWORD)


class Client:
    """An HTTP client as a browser (ticket cookie + CSRF token) or a script (Basic) uses the API."""

    def __init__(self, base: str, basic: tuple[str, str] | None = None) -> None:
        self.base = base
        self.basic = basic
        self.cookie: str | None = None
        self.csrf: str | None = None

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             ) -> tuple[int, Any, dict[str, str]]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.basic:
            req.add_header("Authorization", "Basic " + base64.b64encode(":".join(self.basic).encode()).decode())
        if self.cookie:
            req.add_header("Cookie", self.cookie)
        if self.csrf:
            req.add_header("CSRFPreventionToken", self.csrf)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, raw, hdrs = r.status, r.read(), r.headers
        except urllib.error.HTTPError as exc:
            status, raw, hdrs = exc.code, exc.read(), exc.headers
        ctype = hdrs.get("Content-Type", "")
        payload = json.loads(raw) if ctype.startswith("application/json") else raw.decode()
        return status, payload, {k: v for k, v in hdrs.items()} | {"Set-Cookie": hdrs.get_all("Set-Cookie") or []}

    def login(self, user: str = USER, password: str = PASSWORD) -> tuple[int, Any, dict[str, Any]]:
        status, data, hdrs = self.call("POST", "/api/login", {"username": user, "password": password})
        if status == 200:
            self.cookie = hdrs["Set-Cookie"][0].split(";")[0]
            self.csrf = data["CSRFPreventionToken"]
        return status, data, hdrs

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        code, data, _ = self.call(method, path, body)
        assert code == status, (method, path, code, data)
        return data

    def refused(self, method: str, path: str, body: Any = None, status: int = 400) -> str:
        code, data, _ = self.call(method, path, body)
        assert code == status and set(data) == {"error"}, (method, path, code, data)
        return data["error"]


@pytest.fixture
def store(store: Store) -> Store:
    """The Redis tier's small cluster, with guest 102 on pve2 (so that a node's panel is not everything)."""
    store.set_guest_node(102, "pve2")
    return store


@pytest.fixture
def base(store: Store) -> Iterator[str]:
    """`replq web`'s app on a free port, with the account admin / s3cret-pass."""
    from replq.httpserve import wsgi_server

    httpd = wsgi_server(make_app(store, lambda: Account(USER, HASH)), "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def api(base: str) -> Client:
    return Client(base, basic=(USER, PASSWORD))


def cli_error(*args: str) -> str:
    """What the CLI prints for a refusal, without its `replq: ` prefix."""
    return refused_inproc(*args).removeprefix("replq: ").rstrip("\n")


ENDPOINTS = [("GET", "/api/jobs"), ("POST", "/api/jobs"), ("GET", "/api/jobs/100-0"), ("PUT", "/api/jobs/100-0"),
             ("DELETE", "/api/jobs/100-0"), ("POST", "/api/jobs/100-0/schedule-now"),
             ("POST", "/api/jobs/100-0/enable"), ("POST", "/api/jobs/100-0/disable"), ("GET", "/api/jobs/100-0/log"),
             ("GET", "/api/guests"), ("GET", "/api/nodes"), ("GET", "/api/calendar?expr=*/15"),
             ("GET", "/api/session"), ("POST", "/api/logout"), ("GET", "/api/nonesuch")]


def test_every_api_request_without_a_session_or_credentials_gets_401(base: str, store: Store) -> None:
    store.create_job(Job(id="100-0", target="pve2"))
    anonymous, wrong = Client(base), Client(base, basic=(USER, "wrong-pass"))
    wrong_user = Client(base, basic=("root", PASSWORD))
    forged = Client(base)
    forged.cookie = "REPLQAuthCookie=admin:00:9999999999:" + "0" * 64
    for n, (method, path) in enumerate(ENDPOINTS):
        body = {} if method in ("POST", "PUT") else None
        # Wrong credentials cost a password hash each: a few endpoints show they are refused alike.
        for client in (anonymous, forged) + ((wrong, wrong_user) if n % 5 == 0 else ()):
            code, data, hdrs = client.call(method, path, body)
            assert code == 401, (method, path, code, data)
            assert data == {"error": "authentication required: log in, or send HTTP Basic credentials"}
            assert hdrs["WWW-Authenticate"] == 'Basic realm="replq"'  # for API clients
    # A browser's own requests never get a challenge (no native prompt, no remembered Basic credentials).
    code, _, hdrs = anonymous.call("GET", "/api/jobs", headers={"Sec-Fetch-Mode": "cors"})
    assert code == 401 and "WWW-Authenticate" not in hdrs
    assert store.list_jobs()[0].disable is False  # nothing changed
    # The page itself is public: it is the login form.
    code, page, hdrs = anonymous.call("GET", "/")
    assert code == 200 and hdrs["Content-Type"].startswith("text/html") and "frame-ancestors 'none'" in hdrs[
        "Content-Security-Policy"]
    for text in ('<label for="login-user">User</label>', '<label for="login-password">Password</label>',
                 ">Log in</button>"):
        assert text in page


def test_login_cookie_and_csrf_token(base: str, store: Store) -> None:
    browser = Client(base)
    status, data, _ = browser.login(USER, "not-it")
    assert status == 401 and data == {"error": "login failed: wrong user or password"}
    assert browser.login("someone", PASSWORD)[0] == 401
    status, data, hdrs = browser.login()
    assert status == 200 and data["user"] == USER and data["timezone"] == "UTC"
    (cookie,) = hdrs["Set-Cookie"]
    attrs = [a.strip() for a in cookie.split(";")]
    assert attrs[0].startswith("REPLQAuthCookie=") and {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attrs)
    assert PASSWORD not in cookie

    assert browser.ok("GET", "/api/jobs") == []
    assert browser.ok("GET", "/api/session")["CSRFPreventionToken"] == browser.csrf
    created = browser.ok("POST", "/api/jobs", {"guest": 100, "target": "pve2"}, status=201)

    # A change through the cookie without the session's token is refused, and changes nothing.
    token, browser.csrf = browser.csrf, None
    for method, path in (("POST", "/api/jobs/100-0/disable"), ("DELETE", "/api/jobs/100-0?force=1"),
                         ("PUT", "/api/jobs/100-0"), ("POST", "/api/jobs")):
        assert browser.refused(method, path, {} if method != "DELETE" else None, status=403) == (
            "invalid or missing CSRF token (header CSRFPreventionToken)")
    other = Client(base)
    other.login()
    assert other.csrf != token
    browser.csrf = other.csrf  # another session's token does not fit this cookie
    assert browser.refused("POST", "/api/jobs/100-0/disable", status=403).startswith("invalid or missing CSRF")
    browser.csrf = "é" * 64  # garbage from the network is a refusal, not an error
    assert browser.refused("POST", "/api/jobs/100-0/disable", status=403).startswith("invalid or missing CSRF")
    browser.csrf = token
    assert store.get_job("100-0").disable is False and created["id"] == "100-0"
    assert browser.ok("POST", "/api/jobs/100-0/disable")["disable"] is True

    # Even with the token, a change the browser says comes from another site is refused.
    code, data, _ = browser.call("POST", "/api/jobs/100-0/enable", headers={"Origin": "http://evil.example"})
    assert code == 403 and data["error"].startswith("cross-origin request refused")
    assert store.get_job("100-0").disable is True
    code, _, _ = browser.call("POST", "/api/jobs/100-0/enable", headers={"Origin": base})
    assert code == 200 and store.get_job("100-0").disable is False

    # A tampered ticket is no ticket; logging out clears the cookie.
    name, _, ticket = browser.cookie.partition("=")
    tampered = Client(base)
    tampered.cookie = f"{name}={ticket.replace(USER, 'root', 1)}"
    assert tampered.call("GET", "/api/jobs")[0] == 401
    tampered.cookie = f"{name}={ticket[:-1]}é"
    assert tampered.call("GET", "/api/jobs")[0] == 401
    _, _, hdrs = browser.call("POST", "/api/logout")
    assert hdrs["Set-Cookie"][0].startswith("REPLQAuthCookie=;") and "Max-Age=0" in hdrs["Set-Cookie"][0]


def test_basic_credentials_need_no_csrf_token(api: Client, store: Store) -> None:
    assert api.ok("POST", "/api/jobs", {"guest": "101", "target": "pve3"}, status=201)["id"] == "101-0"
    assert api.ok("POST", "/api/jobs/101-0/disable")["disable"] is True
    assert api.ok("GET", "/api/session")["CSRFPreventionToken"] is None
    code, data, _ = api.call("POST", "/api/jobs/101-0/enable", headers={"Origin": "http://127.0.0.1:1"})
    assert code == 403 and store.get_job("101-0").disable is True


def test_create_assigns_the_lowest_free_job_number(api: Client, store: Store) -> None:
    first = api.ok("POST", "/api/jobs", {"guest": 100, "target": "pve2", "schedule": "*/5", "rate": "10",
                                         "comment": "DR copy", "enabled": True}, status=201)
    assert first["id"] == "100-0" and first["schedule"] == "*/5" and first["rate"] == 10.0
    assert api.ok("POST", "/api/jobs", {"guest": 100, "target": "pve3", "enabled": False}, status=201)["id"] == "100-1"
    assert store.get_job("100-1").disable is True and store.get_job("100-1").effective_schedule == "*/15"
    api.ok("DELETE", "/api/jobs/100-0?force=1")
    assert api.ok("POST", "/api/jobs", {"guest": 100, "target": "pve2"}, status=201)["id"] == "100-0"
    # An explicit id is taken as given (as create-local-job does).
    assert api.ok("POST", "/api/jobs", {"id": "102-7", "target": "pve1"}, status=201)["id"] == "102-7"
    assert api.refused("POST", "/api/jobs", {"id": "102-8", "guest": 101, "target": "pve3"}) == (
        "job '102-8' does not belong to guest 101")
    assert api.refused("POST", "/api/jobs", {"target": "pve3"}) == "missing property 'guest' (or 'id')"
    assert api.refused("POST", "/api/jobs", {"guest": 101}) == "missing property 'target'"
    assert api.refused("POST", "/api/jobs", {"guest": 101, "target": "pve3", "when": 1}).startswith(
        "unknown job property 'when'")


def test_list_read_update_delete_as_the_cli_shows_them(api: Client, store: Store) -> None:
    api.ok("POST", "/api/jobs", {"guest": 100, "target": "pve2", "rate": 5, "comment": "nightly"}, status=201)
    api.ok("POST", "/api/jobs", {"guest": 102, "target": "pve3"}, status=201)
    rows = api.ok("GET", "/api/jobs")
    cli_rows = json.loads(ok("status", "--output-format", "json"))
    # The objects of `status --output-format json`, plus what the table shows besides: the comment,
    # a pending removal, and the State cell of `replq status` (with progress while syncing).
    assert [{k: v for k, v in r.items() if k not in ("comment", "remove_job", "status")} for r in rows] == [
        {**c, "next_sync": r["next_sync"]} for c, r in zip(cli_rows, rows, strict=True)]
    assert [r["comment"] for r in rows] == ["nightly", None] and rows[0]["state"] == rows[0]["status"] == "OK"
    assert [r["id"] for r in api.ok("GET", "/api/jobs?guest=102")] == ["102-0"]
    assert [r["id"] for r in api.ok("GET", "/api/jobs?node=pve1")] == ["100-0"]  # the node's guests' jobs
    assert api.ok("GET", "/api/jobs?node=pve3") == []
    assert api.refused("GET", "/api/jobs?node=pve9", status=404) == "no such cluster node 'pve9'"
    assert api.refused("GET", "/api/jobs?guest=abc") == cli_error("status", "--guest", "abc")

    # While a job runs, its row carries the progress, and `status` reads as `replq status` shows it.
    store.update_state("102-0", worker="replq@pve2")
    store.set_progress("102-0", {"bytes": 12 * 2**20, "total": 48 * 2**20, "rate": 2e6, "eta": 17})
    running = api.ok("GET", "/api/jobs?guest=102")[0]
    assert running["state"] == "SYNCING" and running["progress"]["bytes"] == 12 * 2**20
    assert running["status"] == "SYNCING 12.0 MiB of 48.0 MiB (25%), 2.0 MB/s, ETA 0:17"
    assert running["status"] in ok("status", "--progress")

    read = api.ok("GET", "/api/jobs/100-0")
    cli = json.loads(ok("read", "100-0", "--output-format", "json"))
    assert {k: read[k] for k in cli} == cli  # what `read` prints, the API says the same (and more: disable, schedule)
    updated = api.ok("PUT", "/api/jobs/100-0", {"schedule": "*/30", "delete": ["rate", "comment"],
                                                "digest": read["digest"]})
    assert updated["schedule"] == "*/30" and "rate" not in updated and "comment" not in updated
    assert updated["digest"] != read["digest"]
    # The digest read before someone else's change is stale: refused as `update --digest` refuses it.
    stale = api.refused("PUT", "/api/jobs/100-0", {"comment": "x", "digest": read["digest"]}, status=409)
    assert stale == cli_error("update", "100-0", "--comment", "x", "--digest", read["digest"])
    assert api.ok("PUT", "/api/jobs/100-0", {"enabled": False})["disable"] is True
    unchanged = api.ok("GET", "/api/jobs/100-0")["digest"]
    assert api.ok("PUT", "/api/jobs/100-0", {})["digest"] == unchanged  # nothing to change: as `update ID`
    assert api.refused("PUT", "/api/jobs/100-0", {"target": "pve3"}).startswith("unknown job property 'target'")

    assert api.refused("DELETE", "/api/jobs/100-0?keep=1&force=1") == "keep and force are mutually exclusive"
    assert api.ok("DELETE", "/api/jobs/100-0?keep=1") == {"id": "100-0", "removed": False, "remove_job": "local"}
    assert api.ok("DELETE", "/api/jobs/102-0") == {"id": "102-0", "removed": False, "remove_job": "full"}
    assert store.get_job("102-0").remove_job == "full"
    assert [r["remove_job"] for r in api.ok("GET", "/api/jobs")] == ["local", "full"]
    assert api.ok("DELETE", "/api/jobs/102-0?force=1") == {"id": "102-0", "removed": True}
    assert store.job_ids() == ["100-0"]
    assert api.refused("DELETE", "/api/jobs/102-0", status=404) == cli_error("delete", "102-0")


def test_schedule_now_enable_disable_and_log(api: Client, store: Store) -> None:
    api.ok("POST", "/api/jobs", {"guest": 100, "target": "pve2", "schedule": "*/30"}, status=201)
    store.update_state("100-0", last_try=1_700_000_000, last_sync=1_700_000_000)
    assert store.next_sync("100-0") > 1_700_000_000
    assert api.ok("POST", "/api/jobs/100-0/schedule-now") == {"id": "100-0"}
    assert store.get_state("100-0").last_try == 0 and store.next_sync("100-0") <= time.time()

    assert api.ok("POST", "/api/jobs/100-0/disable")["disable"] is True
    assert store.next_sync("100-0") is None
    assert api.ok("POST", "/api/jobs/100-0/enable")["disable"] is False
    assert store.next_sync("100-0") is not None

    assert api.ok("GET", "/api/jobs/100-0/log") == []
    store.append_log("100-0", "2026-11-25 17:20:03 100-0: start replication job")
    store.append_log("100-0", "2026-11-25 17:20:05 100-0: end replication job")
    assert api.ok("GET", "/api/jobs/100-0/log") == json.loads(ok("log", "100-0", "--output-format", "json"))
    assert len(api.ok("GET", "/api/jobs/100-0/log")) == 2
    for path in ("/api/jobs/100-5/log", "/api/jobs/100-5/schedule-now", "/api/jobs/100-5/enable"):
        method = "GET" if path.endswith("log") else "POST"
        assert api.refused(method, path, status=404) == "replication job '100-5' does not exist"


def test_guests_nodes_and_calendar_preview(api: Client) -> None:
    assert api.ok("GET", "/api/guests") == json.loads(ok("guest", "list", "--output-format", "json"))
    assert api.ok("GET", "/api/nodes") == json.loads(ok("node", "list", "--output-format", "json"))
    preview = api.ok("GET", "/api/calendar?expr=mon..fri+8..17:0/15&iterations=3")
    cli = json.loads(ok("calendar", "mon..fri 8..17:0/15", "--tz", "UTC", "--iterations", "3",
                        "--output-format", "json"))
    assert {k: v for k, v in preview.items() if k != "events"} == {k: v for k, v in cli.items() if k != "events"}
    assert len(preview["events"]) == 3 and preview["timezone"] == "UTC" and preview["job_ok"] is True
    too_often = api.ok("GET", "/api/calendar?expr=*:*:*")
    assert too_often["job_ok"] is False and "more than once a minute" in too_often["reason"]
    assert api.refused("GET", "/api/calendar?expr=*/0") == cli_error("calendar", "*/0")
    assert api.refused("GET", "/api/calendar") == "missing parameter 'expr' (a calendar event, e.g. */15)"
    assert api.refused("GET", "/api/calendar?expr=daily&iterations=0") == "invalid iterations '0': must be 1..1000"


# (API body, the same request to the CLI): a refusal in the browser reads as the CLI's.
SAME_REFUSALS = [
    ({"guest": 100, "target": "pve2", "schedule": "*/0"}, ["create-local-job", "100-0", "pve2", "--schedule", "*/0"]),
    ({"guest": 100, "target": "pve2", "schedule": "*:*:*"},
     ["create-local-job", "100-0", "pve2", "--schedule", "*:*:*"]),
    ({"guest": 100, "target": "pve2", "schedule": "mon 1 1"},
     ["create-local-job", "100-0", "pve2", "--schedule", "mon 1 1"]),
    ({"guest": 100, "target": "pve2", "rate": "0.5"}, ["create-local-job", "100-0", "pve2", "--rate", "0.5"]),
    ({"guest": 100, "target": "pve2", "rate": "fast"}, ["create-local-job", "100-0", "pve2", "--rate", "fast"]),
    ({"guest": 100, "target": "pve1"}, ["create-local-job", "100-0", "pve1"]),
    ({"guest": 100, "target": "pve9"}, ["create-local-job", "100-0", "pve9"]),
    ({"guest": 100, "target": "bad name"}, ["create-local-job", "100-0", "bad name"]),
    ({"guest": 150, "target": "pve2"}, ["create-local-job", "150-0", "pve2"]),
    ({"guest": "99", "target": "pve2"}, ["status", "--guest", "99"]),
    ({"id": "100-01", "target": "pve2"}, ["create-local-job", "100-01", "pve2"]),
]


@pytest.mark.parametrize(("body", "argv"), SAME_REFUSALS, ids=[" ".join(a[1:]) for _, a in SAME_REFUSALS])
def test_create_refusals_are_the_clis(api: Client, store: Store, body: dict[str, Any], argv: list[str]) -> None:
    code, data, _ = api.call("POST", "/api/jobs", body)
    assert code in (400, 404, 409) and data == {"error": cli_error(*argv)}
    assert store.job_ids() == []


def test_update_and_duplicate_refusals_are_the_clis(api: Client) -> None:
    api.ok("POST", "/api/jobs", {"guest": 100, "target": "pve2"}, status=201)
    assert api.refused("POST", "/api/jobs", {"guest": 100, "target": "pve2"}, status=409) == cli_error(
        "create-local-job", "100-1", "pve2")
    assert api.refused("POST", "/api/jobs", {"id": "100-0", "target": "pve3"}, status=409) == cli_error(
        "create-local-job", "100-0", "pve3")
    for schedule in ("*/0", "*:*:*", "sat 25:00"):
        assert api.refused("PUT", "/api/jobs/100-0", {"schedule": schedule}) == cli_error(
            "update", "100-0", "--schedule", schedule)
    assert api.refused("PUT", "/api/jobs/100-0", {"rate": "-1"}) == cli_error("update", "100-0", "--rate=-1")
    assert api.refused("PUT", "/api/jobs/100-0", {"delete": "rate,,x"}) == cli_error(
        "update", "100-0", "--delete", "rate,,x").replace("--delete", "delete")
    assert api.refused("PUT", "/api/jobs/100-0", {"delete": ["target"]}) == cli_error(
        "update", "100-0", "--delete", "target")
    assert api.refused("PUT", "/api/jobs/100-0", {"comment": "x", "digest": "abc"}) == cli_error(
        "update", "100-0", "--comment", "x", "--digest", "abc").replace("--digest", "digest")
    assert api.refused("GET", "/api/jobs/100-01") == cli_error("read", "100-01")
    assert api.refused("GET", "/api/jobs/100-9", status=404) == cli_error("read", "100-9")


def test_malformed_requests(api: Client, base: str) -> None:
    code, data, _ = api.call("POST", "/api/jobs", headers={"Content-Type": "text/plain"})
    assert code == 400  # no body: nothing given
    req = urllib.request.Request(base + "/api/jobs", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": api_auth()})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 400 and json.loads(exc.value.read())["error"].startswith("invalid JSON body")
    req = urllib.request.Request(base + "/api/jobs", data=b'{"guest": 100}', method="POST",
                                 headers={"Content-Type": "text/plain", "Authorization": api_auth()})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 415
    assert api.refused("POST", "/api/jobs", ["guest"]) == "expected a JSON object"
    assert api.refused("PATCH", "/api/jobs/100-0", status=405).startswith("method PATCH not allowed")
    assert api.refused("GET", "/api/nonesuch", status=404) == "no such API endpoint: GET /api/nonesuch"


def api_auth() -> str:
    return "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def test_account_from_the_settings_with_the_password_hashed(store: Store, redis_url: str) -> None:
    ok("settings", "set", "web_user", "ops")
    ok("settings", "set", "web_password", "correct horse")
    stored = json.loads(store.redis.hget(store.k("settings"), "web_password"))
    assert is_hash(stored) and "correct horse" not in stored and verify_password("correct horse", stored)
    assert "correct horse" not in ok("settings", "show")
    assert cli_error("settings", "set", "web_password", "short") == "web_password: at least 8 characters"
    # A hash is taken as it is (a restored configuration carries the hash, not the password).
    ok("settings", "set", "web_password", stored)
    assert json.loads(store.redis.hget(store.k("settings"), "web_password")) == stored

    from replq.httpserve import wsgi_server

    httpd = wsgi_server(make_app(store, settings_account(store)), "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        browser = Client(f"http://127.0.0.1:{httpd.server_port}")
        assert browser.login("ops", "correct horse")[0] == 200
        assert browser.ok("GET", "/api/nodes")
        # A new password applies at once, without a restart; the old one no longer logs in.
        ok("settings", "set", "web_password", "battery staple")
        assert Client(browser.base).login("ops", "correct horse")[0] == 401
        assert Client(browser.base, basic=("ops", "battery staple")).ok("GET", "/api/guests")
        # A session of a user who is no longer the account ends.
        ok("settings", "set", "web_user", "admin2")
        assert browser.call("GET", "/api/jobs")[0] == 401
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_replq_web_command(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`replq web` as an operator runs it: account from the environment (the password may be its hash),
    listening on --port; refused in one line without an account or with a malformed one."""
    from replq.sandbox.services import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": REPO, "REPLQ_WEB_USER": "ops", "REPLQ_WEB_PASSWORD": HASH}
    with open(tmp_path / "web.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "replq", "web", "--port", str(port)], env=env, cwd=REPO,
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: proc.poll() is not None or urllib.request.urlopen(base + "/", timeout=2), 30,
                 "replq web to answer", ignore=(OSError,))
        assert proc.poll() is None, (tmp_path / "web.log").read_text()
        assert Client(base, basic=("ops", PASSWORD)).ok("GET", "/api/jobs") == []
        assert Client(base, basic=("admin", PASSWORD)).call("GET", "/api/jobs")[0] == 401
    finally:
        stop_procs([proc])
    assert (tmp_path / "web.log").read_text().strip() == f"replq web: http://127.0.0.1:{port}/"
    assert PASSWORD not in (tmp_path / "web.log").read_text()

    monkeypatch.delenv("REPLQ_WEB_USER", raising=False)
    monkeypatch.delenv("REPLQ_WEB_PASSWORD", raising=False)
    assert cli_error("web") == ("no account for the web GUI: give --basic-auth USER:PASSWORD, set REPLQ_WEB_USER and "
                                "REPLQ_WEB_PASSWORD, or `replq settings set web_user …` and `… web_password …`")
    assert cli_error("web", "--basic-auth", "admin") == "--basic-auth: expected USER:PASSWORD with both parts non-empty"
    assert cli_error("web", "--basic-auth", "ad min:s3cret-pass") == (
        "--basic-auth: web_user: 1-64 characters of letters, digits, _ . @ -")
    assert cli_error("web", "--basic-auth", "admin:short") == "--basic-auth: web_password: at least 8 characters"
    monkeypatch.setenv("REPLQ_WEB_USER", "ops")
    assert cli_error("web") == "REPLQ_WEB_USER/REPLQ_WEB_PASSWORD: set both (or neither)"
    # The hash for an environment file, made without storing anything.
    printed = run("web", "--hash-password", stdin="correct horse\n")
    assert printed.returncode == 0 and verify_password("correct horse", printed.stdout.strip())
    assert run("web", "--hash-password", stdin="short\n").stderr == "replq: web_password: at least 8 characters\n"
    assert run("web", "--hash-password", stdin="").stderr == "replq: --hash-password: no password on stdin\n"
