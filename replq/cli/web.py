"""`replq web`: the web GUI and its JSON API (SPEC §12)."""

from __future__ import annotations

import os
from collections.abc import Callable

import click

from replq.cli.base import Env, pass_env
from replq.errors import ValidationError
from replq.settings import check_setting
from replq.web.auth import Account
from replq.web.server import DEFAULT_PORT, fixed_account, serve, settings_account


def _split(value: str, what: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValidationError(f"{what}: expected USER:PASSWORD with both parts non-empty")
    return user, password


def _fixed(account: Account) -> Callable[[], Account]:
    return lambda: account


@click.command("web")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--basic-auth", "basic_auth", metavar="USER:PASSWORD",
              help="The account (else REPLQ_WEB_USER/REPLQ_WEB_PASSWORD, else settings web_user/web_password).")
@click.option("--hash-password", is_flag=True,
              help="Read a password on stdin, print its salted hash (for REPLQ_WEB_PASSWORD) and exit.")
@pass_env
def web_cmd(env: Env, port: int, address: str, basic_auth: str | None, hash_password: bool) -> None:
    """The web GUI: replication panels for the cluster, each node and each guest, and /api/."""
    if hash_password:
        password = click.get_text_stream("stdin").readline().rstrip("\r\n")
        hashed = check_setting("web_password", password) if password else None
        if hashed is None:
            raise ValidationError("--hash-password: no password on stdin")
        click.echo(hashed)
        return
    store = env.store()
    user, password = os.environ.get("REPLQ_WEB_USER", ""), os.environ.get("REPLQ_WEB_PASSWORD", "")
    if basic_auth:
        source = _fixed(fixed_account(*_split(basic_auth, "--basic-auth"), "--basic-auth"))
    elif user or password:
        if not (user and password):
            raise ValidationError("REPLQ_WEB_USER/REPLQ_WEB_PASSWORD: set both (or neither)")
        source = _fixed(fixed_account(user, password, "REPLQ_WEB_USER/REPLQ_WEB_PASSWORD"))
    else:
        source = settings_account(store)

    def ready(addr: str, bound: int) -> None:
        host = f"[{addr}]" if ":" in addr else addr
        click.echo(f"replq web: http://{host}:{bound}/", err=True)

    serve(store, source, address, port, ready)
