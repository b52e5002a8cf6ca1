"""pvesr's command-line grammar, for every replq command (SPEC §8).

pvesr parses its command line with PVE::CLIHandler and PVE::JSONSchema::get_options on top of
Getopt::Long (prefix_pattern `--|-`, auto_abbrev, ignore_case). Scripts written for pvesr rely on:

- a unique prefix of a command: `replq stat` = `replq status` (CLIHandler's expand_command_name);
  an ambiguous one is refused here with the candidates (pvesr only says "unknown command");
- a long option with one dash or two, `-schedule '*/5'` = `--schedule '*/5'`, and `--opt=value`;
- a unique prefix of an option, any case: `--sched` = `--schedule` (Getopt::Long auto_abbrev,
  ignore_case); an ambiguous one is refused with the candidates, as Getopt::Long does;
- boolean options with an optional value (`:s` in get_options): `--disable`, `--disable 1`,
  `--disable 0`, `--force=no` (parse_boolean: 1/0, yes/no, true/false, on/off);
- list options (formats `*-list`: `--delete`, `--scan`, `--nodes`) repeated: `--delete a --delete b`
  is `--delete a,b`.

replq implements this once, here, by rewriting each command's arguments into click's canonical
form before click parses them: every option is spelled out in full as `--name=value`, every
boolean flag as itself (true) or not at all (false). Deliberate differences from Getopt::Long:
a word after a boolean option is its value only if it is a boolean word (pvesr would take any
word and then fail); a scalar option given twice is refused instead of the last one silently
winning; `-5` or `-` is an argument, never an option (`settings set KEY -5`).

`Group` (used by every replq group) resolves command prefixes and rewrites the arguments of the
command it resolved; its own options (before the command name) are rewritten by its parse_args.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import click

BOOL_WORDS = {"1": True, "on": True, "yes": True, "true": True, "0": False, "off": False, "no": False, "false": False}
_OPTION_TOKEN = re.compile(r"(--?)([A-Za-z][A-Za-z0-9_-]*)(?:=(.*))?", re.DOTALL)


def parse_boolean(word: str) -> bool | None:
    """PVE::JSONSchema::parse_boolean: True, False, or None for a word that is not a boolean."""
    return BOOL_WORDS.get(word.lower())


class ListOption(click.Option):
    """An option whose value is a comma-separated list (PVE's `*-list` formats): given more than
    once, the values are joined with ',' (`--delete a --delete b` = `--delete a,b`)."""


class _Spec:
    """What the rewriter needs of one option of a command."""

    def __init__(self, param: click.Option, command: click.Command) -> None:
        self.param = param
        self.long = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        self.flag = param.is_flag and not param.count and param.is_bool_flag
        self.optional_bool = not param.is_flag and isinstance(param.type, click.types.BoolParamType)
        self.values = 0 if param.is_flag or param.count else max(1, param.nargs)
        self.joined = isinstance(param, ListOption)
        self.repeatable = param.multiple or param.count or self.joined
        # A flag that is off unless given can be turned off by leaving it out.
        self.off_by_default = self.flag and not param.get_default(click.Context(command), call=False)


class Options:
    """The options of one command (or group), looked up the way Getopt::Long does."""

    def __init__(self, command: click.Command, help_names: Sequence[str]) -> None:
        self.exact: dict[str, tuple[_Spec, bool]] = {}  # spelled name → (spec, is the secondary name)
        for p in command.params:
            if isinstance(p, click.Option):
                spec = _Spec(p, command)
                for name in p.opts:
                    self.exact[name] = (spec, False)
                for name in p.secondary_opts:
                    self.exact[name] = (spec, True)
        self.help = [n for n in help_names if n not in self.exact]
        for name in self.help:
            self.exact[name] = (None, False)  # type: ignore[assignment]

    def lookup(self, dashes: str, name: str) -> tuple[str, tuple[_Spec, bool] | None]:
        """(canonical spelling, option) for `-name`/`--name`; None when unknown. Raises on ambiguity."""
        spelled = dashes + name
        if spelled in self.exact:
            return spelled, self.exact[spelled]
        longs = {n[2:]: n for n in self.exact if n.startswith("--")}
        low = name.lower()
        same = [n for n in longs if n.lower() == low]
        if len(same) == 1:
            return longs[same[0]], self.exact[longs[same[0]]]
        hits = sorted(n for n in longs if n.lower().startswith(low))
        if len(hits) == 1:
            return longs[hits[0]], self.exact[longs[hits[0]]]
        if len(hits) > 1:
            raise click.UsageError(f"option '{spelled}' is ambiguous: {', '.join(longs[h] for h in hits)}")
        return spelled, None


def _ignore_unknown(command: click.Command) -> bool:
    return bool(command.context_settings.get("ignore_unknown_options"))


def _fixed_positionals(command: click.Command) -> int | None:
    """How many positional words come before a command's pass-through tail (`sandbox exec NODE --
    CMD...`), or None if it has none: words from there on are the tail's, never options."""
    count = 0
    for p in command.params:
        if isinstance(p, click.Argument):
            if p.nargs == -1:
                return count if isinstance(p.type, click.types.UnprocessedParamType) else None
            count += p.nargs
    return None


def canonical_args(command: click.Command, args: Sequence[str], help_names: Sequence[str],
                   leading_only: bool = False) -> list[str]:
    """The command's arguments with every option in click's canonical spelling (see the module doc).

    leading_only: a group's own options, which end at its first positional word (the command name).
    """
    options = Options(command, help_names)
    tail_at = _fixed_positionals(command)
    out: list[str] = []
    seen: dict[int, list[Any]] = {}
    order: list[_Spec] = []
    positionals = 0
    i = 0
    args = list(args)
    while i < len(args):
        word = args[i]
        i += 1
        if word == "--" or (tail_at is not None and positionals >= tail_at):
            out.extend(args[i - 1:])
            break
        m = _OPTION_TOKEN.fullmatch(word)
        if m is None:
            if leading_only:
                out.extend(args[i - 1:])
                break
            out.append(word)
            positionals += 1
            continue
        dashes, name, inline = m.groups()
        spelled, found = options.lookup(dashes, name)
        if found is None:
            if not _ignore_unknown(command):
                raise click.NoSuchOption(spelled)
            out.append(word)
            continue
        spec, negated = found
        if spec is None:  # --help / -h
            out.append(spelled)
            continue
        if spec.flag or spec.optional_bool:
            value = parse_boolean(inline) if inline is not None else None
            if inline is not None and value is None:
                raise click.BadOptionUsage(spec.long, f"unable to parse boolean option {spec.long} '{inline}'")
            if inline is None:
                value = parse_boolean(args[i]) if i < len(args) else None
                if value is None:
                    value = True
                else:
                    i += 1
            values: list[Any] = [value != negated]
        elif spec.values == 0:  # a counting option: as given
            values = [True]
        elif inline is not None:
            values = [inline]
        else:
            if i + spec.values > len(args):
                raise click.BadOptionUsage(spec.long, f"option '{spec.long}' requires an argument")
            values = args[i : i + spec.values]
            i += spec.values
        key = id(spec)
        if key in seen and not spec.repeatable:
            raise click.BadOptionUsage(spec.long, f"option '{spec.long}' given more than once")
        if key not in seen:
            order.append(spec)
        seen.setdefault(key, []).append(values)
    # Options first (in their first order), then the positional words: click's own layout.
    emitted: list[str] = []
    for spec in order:
        for values in _combine(spec, seen[id(spec)]):
            emitted.extend(_spell(spec, values))
    return emitted + out


def _combine(spec: _Spec, given: list[list[Any]]) -> list[list[Any]]:
    if spec.joined:
        return [[",".join(str(v[0]) for v in given)]]
    return given


def _spell(spec: _Spec, values: list[Any]) -> list[str]:
    if spec.flag:
        on = bool(values[0])
        if on:
            return [spec.long]
        if spec.param.secondary_opts:
            return [spec.param.secondary_opts[0]]
        if not spec.off_by_default:
            raise click.BadOptionUsage(spec.long, f"option '{spec.long}' cannot be turned off")
        return []
    if spec.optional_bool:
        return [f"{spec.long}={'1' if values[0] else '0'}"]
    if spec.values == 0:
        return [spec.long]
    if spec.values == 1:
        return [f"{spec.long}={values[0]}"] if spec.long.startswith("--") else [spec.long, values[0]]
    return [spec.long, *values]


class Group(click.Group):
    """A replq command group with pvesr's grammar: command prefixes, and each command's arguments
    rewritten to canonical form (module doc)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, canonical_args(self, args, ctx.help_option_names, leading_only=True))

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                             list[str]]:
        name = args[0]
        if self.get_command(ctx, name) is None and not name.startswith("-"):
            hits = [c for c in self.list_commands(ctx) if c.startswith(name)
                    and not getattr(self.get_command(ctx, c), "hidden", False)]
            if len(hits) > 1:
                raise click.UsageError(f"ambiguous command '{name}': {', '.join(hits)}", ctx)
            if len(hits) == 1:
                args = [hits[0], *args[1:]]
        cmd_name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None and not isinstance(cmd, click.Group):
            rest = canonical_args(cmd, rest, ctx.help_option_names)
        return cmd_name, cmd, rest


def group(name: str | None = None, **attrs: Any) -> Any:
    """`click.group` with pvesr's grammar (every replq group is made with this)."""
    return click.group(name, cls=Group, **attrs)


Group.group_class = Group
