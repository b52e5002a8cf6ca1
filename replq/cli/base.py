"""What every command shares: the environment (Redis URL, this node), output, refusals, and the
one place where an error becomes the line an operator reads.

Every failure a user can cause ends as one line on stderr: exit 1 when refused or failed,
exit 2 for usage errors. Never a traceback (REPLQ_DEBUG=1 shows one for a bug).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click
import redis

from replq import context, redact
from replq.cli.grammar import Group, ListOption, group
from replq.errors import ReplqError
from replq.output import FORMATS, render_data
from replq.store import Store
from replq.views import split_list


class Env:
    """What every command may need: the Redis URL and this process's node name."""

    def __init__(self, redis: str | None, node: str | None) -> None:
        self._redis = redis
        self._node = node
        self._store: Store | None = None

    @property
    def redis_url(self) -> str:
        url = context.redis_url(self._redis)
        redact.remember(url)  # whatever error text quotes it, fail() hides its password
        return url

    @property
    def node(self) -> str:
        return context.local_node(self._node)

    @property
    def explicit_node(self) -> str | None:
        """The node named by --node or REPLQ_NODE (never guessed from the host name), else None."""
        return self._node or os.environ.get("REPLQ_NODE") or None

    def store(self) -> Store:
        """The cluster store (connected on first use, so that `calendar` needs no Redis)."""
        if self._store is None:
            self._store = Store.from_url(self.redis_url)
        return self._store


pass_env = click.make_pass_decorator(Env)


def output_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add --output-format text|json|json-pretty|yaml to a command that prints data."""
    return click.option(
        "--output-format",
        "output_format",
        type=click.Choice(FORMATS),
        default="text",
        show_default=True,
        help="Output format.",
    )(func)


def emit(data: Any, fmt: str, text: Callable[[], str] | str | None = None) -> None:
    """Print `data` in a machine format, or the text rendering for `text`."""
    if fmt == "text":
        out = text() if callable(text) else text
        if out is None:
            out = render_data(data, "yaml")
        if out:
            click.echo(out)
    else:
        click.echo(render_data(data, fmt))


def fail(message: str, code: int = 1) -> None:
    """Refuse with one line on stderr: a line break in it (say from an argument) is shown as \\n, and
    a password of the Redis URL never appears."""
    message = redact.scrub(message)
    message = message.replace("\r", "\\r").replace("\n", "\\n").encode("utf-8", "backslashreplace").decode()
    prefix = "" if message.startswith("replq") else "replq: "
    click.echo(f"{prefix}{message}", err=True)
    sys.exit(code)


def error_line(exc: BaseException) -> tuple[str, int]:
    """The operator's one line and exit code for an error that ended a command."""
    if isinstance(exc, click.UsageError):
        ctx = exc.ctx
        where = f"{ctx.command_path}: " if ctx is not None else ""
        return f"{where}{exc.format_message()}", 2
    if isinstance(exc, click.ClickException):
        return exc.format_message(), exc.exit_code
    if isinstance(exc, ReplqError):
        return str(exc), exc.exit_code
    if isinstance(exc, redis.exceptions.RedisError):
        return f"Redis: {exc.__class__.__name__}: {exc}", 1
    if isinstance(exc, OSError):  # e.g. a file not found: one line, not a traceback
        return f"{exc.__class__.__name__}: {exc}", 1
    return f"internal error: {exc.__class__.__name__}: {exc}", 1


def run_group(root: click.Group, argv: list[str] | None) -> None:
    """Run the root group without click's multi-line usage errors or tracebacks."""
    try:
        rv = root.main(args=argv, prog_name="replq", standalone_mode=False)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BrokenPipeError:
        sys.exit(1)
    except click.exceptions.NoArgsIsHelpError as exc:  # `replq`, `replq node`: the usage (as pvesr prints it)
        click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message(), err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - every error becomes one line; REPLQ_DEBUG shows the trace
        if os.environ.get("REPLQ_DEBUG") and not isinstance(exc, ReplqError | click.ClickException):
            raise
        fail(*error_line(exc))
    sys.exit(rv if isinstance(rv, int) else 0)


__all__ = ["Env", "Group", "ListOption", "emit", "error_line", "fail", "group", "output_option", "pass_env",
           "run_group", "split_list"]
