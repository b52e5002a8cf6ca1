"""Rendering of command results: text tables, json, json-pretty, yaml (SPEC §8)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import yaml

FORMATS = ("text", "json", "json-pretty", "yaml")


def render_data(data: Any, fmt: str) -> str:
    """Serialise structured data for the machine-readable formats."""
    if fmt == "json":
        return json.dumps(data, sort_keys=False, separators=(",", ":"))
    if fmt == "json-pretty":
        return json.dumps(data, indent=4, sort_keys=False)
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip("\n")
    raise ValueError(f"not a data format: {fmt}")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A left-aligned text table, columns separated by at least one space (pvesr style)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)
