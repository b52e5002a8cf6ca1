"""`replq help [CMD...] [--verbose]`, as pvesr's (PVE::CLIHandler's help command).

    replq help              USAGE: replq <COMMAND> [ARGS] [OPTIONS], then one usage line per command
    replq help CMD          the command's full help (verbose is the default with a command)
    replq help CMD --verbose 0   its usage line only
    replq help --verbose    the full help of every command

Command names may be prefixes, as everywhere (`replq help stat`).
"""

from __future__ import annotations

from collections.abc import Iterator

import click

INDENT = " " * 7


def leaves(group: click.Group, ctx: click.Context) -> Iterator[tuple[click.Context, click.Command]]:
    """Every runnable command below `group` with its context, in name order (help itself too)."""
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        sub = click.Context(cmd, info_name=name, parent=ctx)
        if isinstance(cmd, click.Group):
            yield from leaves(cmd, sub)
        else:
            yield sub, cmd


def usage_line(ctx: click.Context, cmd: click.Command) -> str:
    """`replq create-local-job <id> <target> [OPTIONS]` (getopt_usage's short form)."""
    words = [ctx.command_path]
    for p in cmd.params:
        if isinstance(p, click.Argument):
            name = f"<{p.human_readable_name.lower()}>"
            words.append(f"{{{name}}}" if p.nargs == -1 else (name if p.required else f"[{name}]"))
    if any(isinstance(p, click.Option) for p in cmd.params):
        words.append("[OPTIONS]")
    return " ".join(words)


def resolve(root: click.Group, ctx: click.Context, names: tuple[str, ...]) -> tuple[click.Context, click.Command]:
    """The command that `replq NAMES...` names (prefixes resolved as the command line does)."""
    cmd: click.Command = root
    for name in names:
        if not isinstance(cmd, click.Group):
            raise click.UsageError(f"unknown command '{ctx.command_path} {name}'")
        _, found, _ = cmd.resolve_command(ctx, [name])
        assert found is not None  # resolve_command raises for an unknown name
        ctx = click.Context(found, info_name=found.name, parent=ctx)
        cmd = found
    return ctx, cmd


@click.command("help")
@click.argument("command", nargs=-1)
@click.option("--verbose", type=click.BOOL, default=None, metavar="[0|1]", help="Verbose output format.")
@click.pass_context
def help_cmd(ctx: click.Context, command: tuple[str, ...], verbose: bool | None) -> None:
    """Get help about specified command."""
    root_ctx = ctx.find_root()
    root = root_ctx.command
    assert isinstance(root, click.Group)
    verbose = bool(command) if verbose is None else verbose
    top = click.Context(root, info_name=root_ctx.info_name, help_option_names=root_ctx.help_option_names)
    if command:
        sub_ctx, cmd = resolve(root, top, command)
        if isinstance(cmd, click.Group):
            pairs = list(leaves(cmd, sub_ctx))
        else:
            click.echo(cmd.get_help(sub_ctx) if verbose else f"USAGE: {usage_line(sub_ctx, cmd)}")
            return
    else:
        pairs = list(leaves(root, top))
    click.echo(f"USAGE: {root_ctx.info_name} <COMMAND> [ARGS] [OPTIONS]\n")
    if verbose:
        click.echo("\n\n".join(c.get_help(x) for x, c in pairs))
    else:
        click.echo("\n".join(INDENT + usage_line(x, c) for x, c in pairs))
