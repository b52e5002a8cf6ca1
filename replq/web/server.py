"""`replq web`'s server: the account it accepts and the app on a threaded HTTP server."""

from __future__ import annotations

from collections.abc import Callable

from replq import httpserve
from replq.errors import ReplqError, ValidationError
from replq.settings import check_setting
from replq.store import Store
from replq.web.app import WebApp
from replq.web.auth import Account, Authority

DEFAULT_PORT = 8737


def fixed_account(user: str, password: str, where: str) -> Account:
    """An account from a flag or the environment; the password may be given as its hash."""
    try:
        return Account(check_setting("web_user", user), check_setting("web_password", password))
    except ValidationError as exc:
        raise ValidationError(f"{where}: {exc}") from None


def settings_account(store: Store) -> Callable[[], Account | None]:
    """The account in the cluster settings web_user/web_password, read at each use, so that
    `replq settings set` applies without a restart."""

    def read() -> Account | None:
        settings = store.get_settings()
        user, hashed = settings.get("web_user"), settings.get("web_password")
        if isinstance(user, str) and isinstance(hashed, str) and user and hashed:
            return Account(user, hashed)
        return None

    return read


def make_app(store: Store, account: Callable[[], Account | None]) -> WebApp:
    return WebApp(store, Authority(account))


def serve(store: Store, account: Callable[[], Account | None], address: str, port: int,
          ready: Callable[[str, int], None] | None = None) -> None:
    if account() is None:
        raise ReplqError("no account for the web GUI: give --basic-auth USER:PASSWORD, set REPLQ_WEB_USER and "
                         "REPLQ_WEB_PASSWORD, or `replq settings set web_user …` and `… web_password …`")
    httpserve.serve(make_app(store, account), address, port, ready)
