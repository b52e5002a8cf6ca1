"""The `replq` command line: the click group, shared options, output and error handling.

Commands live in replq/cli_*.py by area and attach themselves to `cli`; this module only
parses, calls and prints. Every failure a user can cause ends as one line on stderr:
exit 1 when refused or failed, exit 2 for usage errors. Never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from replq import context
from replq.errors import ReplqError
from replq.output import FORMATS, render_data


class Env:
    """What every command may need: the Redis URL and this process's node name."""

    def __init__(self, redis: str | None, node: str | None) -> None:
        self._redis = redis
        self._node = node
        self._store: Any = None

    @property
    def redis_url(self) -> str:
        return context.redis_url(self._redis)

    @property
    def node(self) -> str:
        return context.local_node(self._node)

    def store(self) -> Any:
        """The cluster store (created on first use, so that `calendar` needs no Redis)."""
        if self._store is None:
            from replq.store import Store

            self._store = Store.from_url(self.redis_url)
        return self._store


pass_env = click.make_pass_decorator(Env)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--redis", "redis_url", metavar="URL", help="Redis URL (else REPLQ_REDIS_URL, the sandbox, the default).")
@click.option("--node", "node", metavar="NAME", help="This process's node (else REPLQ_NODE, the host name).")
@click.version_option(package_name="replq")
@click.pass_context
def cli(ctx: click.Context, redis_url: str | None, node: str | None) -> None:
    """replq: scheduled ZFS storage replication for guests (pvesr-compatible)."""
    ctx.obj = Env(redis_url, node)


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
    """Refuse with one line on stderr."""
    prefix = "" if message.startswith("replq") else "replq: "
    click.echo(f"{prefix}{message}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the group without click's multi-line usage errors or tracebacks."""
    try:
        rv = cli.main(args=argv, prog_name="replq", standalone_mode=False)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except click.UsageError as exc:
        ctx = exc.ctx
        where = f"{ctx.command_path}: " if ctx is not None else ""
        fail(f"{where}{exc.format_message()}", 2)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except ReplqError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BrokenPipeError:
        sys.exit(1)
    except OSError as exc:  # e.g. Redis refused, file not found: one line, not a traceback
        fail(f"{exc.__class__.__name__}: {exc}", 1)
    except Exception as exc:  # noqa: BLE001 - last resort: one line; REPLQ_DEBUG shows the trace
        import os

        if os.environ.get("REPLQ_DEBUG"):
            raise
        fail(f"internal error: {exc.__class__.__name__}: {exc}", 1)
    sys.exit(rv if isinstance(rv, int) else 0)


# Command areas attach themselves to `cli` on import.
from replq import (  # noqa: E402,F401
    cli_calendar,
    cli_inventory,
    cli_jobs,
    cli_migrate,
    cli_run,
    cli_runtime,
    cli_sandbox,
    cli_services,
)
