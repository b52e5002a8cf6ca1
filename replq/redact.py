"""Secrets never leave: how a URL or a setting that holds a secret is shown to anyone.

- `redact_url`: a Redis URL (or `;`-separated Sentinel list) with its password replaced by
  `***`, user, host, port and database kept, for error lines and start lines.
- `mask_url`: a webhook URL reduced to scheme, host and port, since its token may sit in the
  user info, the query or the path (`https://hooks.example/services/T0/B0/XXXX`).
- `scrub`: a message with every secret this process has seen in a URL (`remember`) replaced,
  the last line of defence for error text from libraries that quote what they were given.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

HIDDEN = "***"
# Query parameters of a redis/sentinel URL that carry a credential.
_SECRET_PARAMS = ("password", "sentinel_password", "token", "secret")

_remembered: set[str] = set()


def _split(url: str):  # noqa: ANN202 - urllib's SplitResult
    try:
        return urlsplit(url)
    except ValueError:  # e.g. an invalid IPv6 netloc: nothing can be said about its parts
        return None


def secrets_of(url: str) -> list[str]:
    """The passwords and secret query values in a URL (or `;`-separated URL list)."""
    found = []
    for part in url.split(";"):
        p = _split(part)
        if p is None:
            continue
        userinfo, at, _ = p.netloc.rpartition("@")
        if at and ":" in userinfo:
            password = userinfo.partition(":")[2]
            found += [password, unquote(password)]  # libraries quote it decoded
        found += [v for k, v in parse_qsl(p.query, keep_blank_values=True) if k.lower() in _SECRET_PARAMS]
    return [s for s in dict.fromkeys(found) if s]


def redact_url(url: str) -> str:
    """The URL without its password (user info `user:***@`) or secret query values."""
    out = []
    for part in url.split(";"):
        p = _split(part)
        if p is None:
            out.append(HIDDEN if secrets_of(part) or "@" in part else part)
            continue
        userinfo, at, hostport = p.netloc.rpartition("@")
        netloc = p.netloc
        if at and ":" in userinfo:
            netloc = f"{userinfo.partition(':')[0]}:{HIDDEN}@{hostport}"
        query = p.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, HIDDEN if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*")
        out.append(urlunsplit((p.scheme, netloc, p.path, query, p.fragment)))
    return ";".join(out)


def mask_url(url: str) -> str:
    """Scheme, host and port only; anything after them (user info, path, query) is `***`."""
    p = _split(url)
    if p is None or not p.hostname:
        return HIDDEN
    host = f"[{p.hostname}]" if ":" in p.hostname else p.hostname
    try:
        port = f":{p.port}" if p.port else ""
    except ValueError:
        port = ""
    rest = p.netloc.rpartition("@")[0] or p.path not in ("", "/") or p.query or p.fragment
    return f"{p.scheme}://{host}{port}/{HIDDEN if rest else ''}"


def remember(url: str) -> None:
    """Note the secrets of a URL this process uses, so that `scrub` can hide them anywhere."""
    _remembered.update(secrets_of(url))


def scrub(text: str) -> str:
    """`text` with every remembered secret replaced by `***` (longest first: one may contain another)."""
    for secret in sorted(_remembered, key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return text
