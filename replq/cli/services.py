"""replq commands: the monitoring services `replq flower` and `replq metrics` (SPEC §8, §9).

Both listen on 127.0.0.1 unless told otherwise, and both take basic auth. Flower can start
Celery tasks and shut down workers, so it refuses to listen beyond loopback without basic
auth; the read-only metrics exporter warns.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

import click
import redis

from replq.cli.base import Env, pass_env
from replq.errors import ValidationError
from replq.redact import redact_url
from replq.store import Store

FLOWER_PORT = 5555
# Flower's task list shows args, so an operator sees which job each replq.replicate task is.
FLOWER_TASK_COLUMNS = "name,args,state,received,started,runtime,worker,uuid"


def is_loopback(address: str) -> bool:
    """True only if every address the name resolves to is a loopback address ('' = all interfaces)."""
    if address in ("", "*"):
        return False
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(address, None)
    except OSError:
        raise ValidationError(f"--address: cannot resolve '{address}'") from None
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_basic_auth(value: str, what: str) -> str:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValidationError(f"{what}: expected USER:PASSWORD with both parts non-empty")
    # Flower splits its basic_auth option on commas (several credentials).
    if "," in value:
        raise ValidationError(f"{what}: user and password must not contain ','")
    return value


def given_credentials(explicit: str | None, service: str) -> str | None:
    """USER:PASSWORD from --basic-auth, else REPLQ_<SERVICE>_USER/_PASSWORD (empty = unset)."""
    if explicit:
        return check_basic_auth(explicit, "--basic-auth")
    names = f"REPLQ_{service}_USER", f"REPLQ_{service}_PASSWORD"
    user, password = (os.environ.get(n) for n in names)
    if user or password:
        return check_basic_auth(f"{user or ''}:{password or ''}", "/".join(names))
    return None


def flower_credentials(env: Env, explicit: str | None) -> str | None:
    """USER:PASSWORD from --basic-auth, REPLQ_FLOWER_USER/PASSWORD, Flower's FLOWER_BASIC_AUTH, the settings."""
    given = given_credentials(explicit, "FLOWER")
    if given:
        return given
    if os.environ.get("FLOWER_BASIC_AUTH"):
        return check_basic_auth(os.environ["FLOWER_BASIC_AUTH"], "FLOWER_BASIC_AUTH")
    try:
        settings = env.store().get_settings()
    except Exception:  # noqa: BLE001 - no Redis yet: Flower itself will say so; no stored credentials
        return None
    user, password = settings.get("flower_user"), settings.get("flower_password")
    if isinstance(user, str) and isinstance(password, str) and user and password:
        return check_basic_auth(f"{user}:{password}", "settings flower_user/flower_password")
    return None


@click.command("flower")
@click.option("--port", type=click.IntRange(0, 65535), default=FLOWER_PORT, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--basic-auth", "basic_auth", metavar="USER:PASSWORD",
              help="Credentials (else REPLQ_FLOWER_USER/REPLQ_FLOWER_PASSWORD, else settings flower_user/_password).")
@pass_env
def flower(env: Env, port: int, address: str, basic_auth: str | None) -> None:
    """Flower, the Celery monitor, for replq's workers and tasks."""
    credentials = flower_credentials(env, basic_auth)
    if credentials is None and not is_loopback(address):
        raise ValidationError(f"refusing to serve Flower on non-loopback address '{address}' without basic auth "
                              "(--basic-auth or REPLQ_FLOWER_USER/REPLQ_FLOWER_PASSWORD)")
    # The app reads the broker URL from the environment; the credentials reach Flower the same
    # way, so they never show up in `ps`.
    os.environ["REPLQ_REDIS_URL"] = env.redis_url
    os.environ.pop("FLOWER_BASIC_AUTH", None)
    if credentials:
        os.environ["FLOWER_BASIC_AUTH"] = credentials
    os.environ.setdefault("FLOWER_TASKS_COLUMNS", FLOWER_TASK_COLUMNS)
    # Celery costs ~0.3 s to import: only the flower command needs it.
    from replq.app import make_app

    app = make_app(env.redis_url)
    click.echo(f"replq flower: http://{_url_host(address)}:{port}/ (broker {redact_url(env.redis_url)}"
               f"{', basic auth' if credentials else ''})", err=True)
    app.start(["flower", f"--port={port}", f"--address={address}"])


@click.command("metrics")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Port (default 9737).")
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--basic-auth", "basic_auth", metavar="USER:PASSWORD",
              help="Require these credentials (else REPLQ_METRICS_USER/REPLQ_METRICS_PASSWORD; none: open).")
@pass_env
def metrics(env: Env, port: int | None, address: str, basic_auth: str | None) -> None:
    """Serve per-job Prometheus metrics on http://ADDRESS:PORT/metrics (read from the store per scrape)."""
    # prometheus_client's server is only needed by this command.
    from replq import metrics as m

    credentials = given_credentials(basic_auth, "METRICS")
    if credentials is None and not is_loopback(address):
        click.echo(f"replq metrics: warning: serving on '{address}' without basic auth (set REPLQ_METRICS_USER/"
                   "REPLQ_METRICS_PASSWORD, or listen on 127.0.0.1 behind a TLS proxy)", err=True)

    def ready(addr: str, bound: int) -> None:
        click.echo(f"replq metrics: http://{_url_host(addr)}:{bound}/metrics{' (basic auth)' if credentials else ''}",
                   err=True)

    def store() -> Any:
        # A scrape must answer within Prometheus' timeout even when Redis hangs: bounded socket waits.
        return Store(redis.Redis.from_url(env.redis_url, decode_responses=True, socket_timeout=5,
                                          socket_connect_timeout=3))

    m.serve(store, address, m.DEFAULT_PORT if port is None else port, ready=ready, credentials=credentials)


def _url_host(address: str) -> str:
    if address in ("", "0.0.0.0", "::"):
        return socket.gethostname()
    return f"[{address}]" if ":" in address else address
