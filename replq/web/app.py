"""The web GUI's HTTP side (a WSGI app): the page and its files, login and logout, the
authentication of every API request, CSRF and origin checks, routing to api.py, and every
refusal as `{"error": "<the CLI's line>"}` with a status code that says what kind it is.

    /                  the page (public: it holds the login form and no data)
    /static/NAME       its script and style sheet
    POST /api/login    {"username", "password"} → ticket cookie + {"user", "CSRFPreventionToken", "timezone"}
    /api/…             401 without a valid ticket cookie or Basic credentials; a change (POST, PUT,
                       DELETE) through the cookie needs the CSRFPreventionToken header, and any
                       change is refused when the browser says it comes from another origin
"""

from __future__ import annotations

import json
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis

from replq.errors import Conflict, NotFound, ReplqError, ValidationError
from replq.model import show
from replq.store import Store
from replq.web import api
from replq.web.auth import COOKIE, CSRF_HEADER, TICKET_LIFETIME, Authority, Session

MAX_BODY = 64 * 1024
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/style.css": ("style.css", "text/css; charset=utf-8")}
PAGE_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                                "base-uri 'none'; form-action 'self'"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
]
CHANGES = ("POST", "PUT", "DELETE")


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    environ: dict[str, Any]
    params: dict[str, str] = field(default_factory=dict)
    session: Session | None = None  # a cookie session (None for Basic credentials)
    user: str | None = None

    @classmethod
    def of(cls, environ: dict[str, Any]) -> Request:
        # PEP 3333 hands the path over as latin-1; the bytes are UTF-8 (or garbage, kept for the message).
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "surrogateescape")
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}
        return cls(environ.get("REQUEST_METHOD", "GET").upper(), path or "/", query, environ)

    def header(self, name: str) -> str | None:
        return self.environ.get("HTTP_" + name.upper().replace("-", "_"))

    def cookie(self, name: str) -> str | None:
        for part in (self.header("Cookie") or "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return None

    def json(self) -> dict[str, Any]:
        try:
            length = int(self.environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise HttpError(400, "invalid Content-Length") from None
        if length > MAX_BODY:
            raise HttpError(413, f"request body larger than {MAX_BODY} bytes")
        raw = self.environ["wsgi.input"].read(length) if length > 0 else b""
        if not raw.strip():
            return {}
        if (self.environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower() != "application/json":
            raise HttpError(415, "expected a JSON body (Content-Type: application/json)")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise HttpError(400, f"invalid JSON body ({exc})") from None
        if not isinstance(data, dict):
            raise HttpError(400, "expected a JSON object")
        return data


Handler = Callable[[Store, Request], Any]
JOB = r"/api/jobs/(?P<id>[^/]+)"
ROUTES: list[tuple[str, re.Pattern[str], Handler, int]] = [
    (m, re.compile(p), h, ok) for m, p, h, ok in (
        ("GET", r"/api/jobs", lambda s, r: api.list_jobs(s, r.query.get("guest"), r.query.get("node")), 200),
        ("POST", r"/api/jobs", lambda s, r: api.create_job(s, r.json()), 201),
        ("GET", JOB, lambda s, r: api.read_job(s, r.params["id"]), 200),
        ("PUT", JOB, lambda s, r: api.update_job(s, r.params["id"], r.json()), 200),
        ("DELETE", JOB, lambda s, r: api.delete_job(s, r.params["id"], r.query.get("keep"), r.query.get("force")),
         200),
        ("POST", JOB + "/schedule-now", lambda s, r: api.schedule_now(s, r.params["id"]), 200),
        ("POST", JOB + "/enable", lambda s, r: api.set_enabled(s, r.params["id"], True), 200),
        ("POST", JOB + "/disable", lambda s, r: api.set_enabled(s, r.params["id"], False), 200),
        ("GET", JOB + "/log", lambda s, r: api.job_log(s, r.params["id"]), 200),
        ("GET", r"/api/guests", lambda s, r: api.guests(s), 200),
        ("GET", r"/api/nodes", lambda s, r: api.nodes(s), 200),
        ("GET", r"/api/calendar", lambda s, r: api.calendar(s, r.query.get("expr"), r.query.get("iterations")),
         200),
    )
]


def status_of(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and the operator's line for an error (the CLI prints the same line)."""
    if isinstance(exc, HttpError):
        return exc.status, str(exc)
    if isinstance(exc, ValidationError):
        return 400, str(exc)
    if isinstance(exc, NotFound):
        return 404, str(exc)
    if isinstance(exc, Conflict):
        return 409, str(exc)
    if isinstance(exc, ReplqError):
        return 400, str(exc)
    if isinstance(exc, redis.exceptions.RedisError):
        return 503, f"Redis: {exc.__class__.__name__}: {exc}"
    return 500, f"internal error: {exc.__class__.__name__}: {exc}"


class WebApp:
    """The WSGI application; `store` is shared by the server's threads (redis-py pools connections)."""

    def __init__(self, store: Store, authority: Authority) -> None:
        self.store = store
        self.auth = authority

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        req = Request.of(environ)
        headers: list[tuple[str, str]] = []
        try:
            if not req.path.startswith("/api/"):
                return self._static(req, start_response)
            status, data = self._api(req, headers)
        except Exception as exc:  # noqa: BLE001 - every failure is a JSON answer, never a dropped connection
            status, message = status_of(exc)
            if status == 500:
                traceback.print_exc(file=sys.stderr)
            headers += getattr(exc, "headers", [])
            data = {"error": message}
        body = json.dumps(data).encode()
        start_response(f"{status} {HTTPStatus(status).phrase}", [
            ("Content-Type", "application/json; charset=utf-8"), ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"), *headers])
        return [body]

    # ---- the page ----------------------------------------------------------------------------
    def _static(self, req: Request, start_response: Callable[..., Any]) -> list[bytes]:
        entry = STATIC.get(req.path)
        if entry is None or req.method not in ("GET", "HEAD"):
            body = b"not found\n"
            start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        name, ctype = entry
        body = (resources.files("replq.web") / "static" / name).read_bytes()
        start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body))),
                                  ("X-Content-Type-Options", "nosniff"), *PAGE_HEADERS])
        return [b""] if req.method == "HEAD" else [body]

    # ---- the API -----------------------------------------------------------------------------
    def _api(self, req: Request, headers: list[tuple[str, str]]) -> tuple[int, Any]:
        if req.method in CHANGES:
            self._same_origin(req)
        if req.path == "/api/login" and req.method == "POST":
            return 200, self._login(req, headers)
        self._authenticate(req, headers)
        if req.path == "/api/session" and req.method == "GET":
            return 200, self._session_info(req.user or "", req.session)
        if req.path == "/api/logout" and req.method == "POST":
            headers.append(("Set-Cookie", f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"))
            return 200, {"user": None}
        allowed = []
        for method, pattern, handler, ok in ROUTES:
            m = pattern.fullmatch(req.path)
            if m is None:
                continue
            if method != req.method:
                allowed.append(method)
                continue
            req.params = m.groupdict()
            return ok, handler(self.store, req)
        if allowed:
            raise HttpError(405, f"method {req.method} not allowed on {show(req.path)} (allowed: "
                                 f"{', '.join(allowed)})", [("Allow", ", ".join(allowed))])
        raise HttpError(404, f"no such API endpoint: {req.method} {show(req.path)}")

    def _same_origin(self, req: Request) -> None:
        """A browser names the page a change comes from: refuse one from another site, whatever
        credentials it carries (a browser may hold Basic credentials and send them anywhere)."""
        origin = req.header("Origin")
        if origin is not None and urlsplit(origin).netloc != (req.header("Host") or ""):
            raise HttpError(403, f"cross-origin request refused (Origin {show(origin)})")

    def _authenticate(self, req: Request, headers: list[tuple[str, str]]) -> None:
        authorization = req.header("Authorization")
        if authorization is not None:
            req.user = self.auth.basic(authorization)
        else:
            ticket = req.cookie(COOKIE)
            req.session = self.auth.session(ticket) if ticket else None
            req.user = req.session.user if req.session else None
        if req.user is None:
            # A browser's fetch never gets a Basic challenge: no login prompt, and no Basic
            # credentials remembered by the browser (which any site could then make it send).
            challenge = [] if req.header("Sec-Fetch-Mode") else [("WWW-Authenticate", 'Basic realm="replq"')]
            raise HttpError(401, "authentication required: log in, or send HTTP Basic credentials", challenge)
        if req.session is None:
            return
        if req.method in CHANGES and not self.auth.csrf_ok(req.session, req.header(CSRF_HEADER)):
            raise HttpError(403, f"invalid or missing CSRF token (header {CSRF_HEADER})")
        renewed = self.auth.renewal(req.session)
        if renewed is not None:
            req.session = renewed
            headers.append(("Set-Cookie", self._cookie(renewed, req)))

    def _cookie(self, session: Session, req: Request) -> str:
        secure = "; Secure" if req.environ.get("wsgi.url_scheme") == "https" else ""
        return (f"{COOKIE}={self.auth.ticket(session)}; Path=/; HttpOnly; SameSite=Strict; "
                f"Max-Age={TICKET_LIFETIME}{secure}")

    def _login(self, req: Request, headers: list[tuple[str, str]]) -> dict[str, Any]:
        body = req.json()
        user, password = body.get("username"), body.get("password")
        if not isinstance(user, str) or not isinstance(password, str):
            raise HttpError(400, "expected {\"username\": …, \"password\": …}")
        session = self.auth.login(user, password)
        if session is None:
            raise HttpError(401, "login failed: wrong user or password")
        headers.append(("Set-Cookie", self._cookie(session, req)))
        return self._session_info(session.user, session)

    def _session_info(self, user: str, session: Session | None) -> dict[str, Any]:
        return {"user": user, CSRF_HEADER: self.auth.csrf_token(session) if session else None,
                "timezone": self.store.get_settings()["timezone"]}

