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


def progress_line(p: dict) -> str:
    """`12.3 MiB of 45.6 MiB (27%), 2.0 MB/s, ETA 0:17` from the engine's progress record."""
    sent, total, rate, eta = p.get("bytes") or 0, p.get("total"), p.get("rate"), p.get("eta")
    text = human_bytes(sent)
    if total:
        text += f" of {human_bytes(total)} ({min(100, 100 * sent // max(total, 1))}%)"
    if rate is not None:
        text += f", {rate / 1e6:.1f} MB/s"
    if eta is not None:
        m, s = divmod(int(eta), 60)
        h, m = divmod(m, 60)
        text += f", ETA {h}:{m:02d}:{s:02d}" if h else f", ETA {m}:{s:02d}"
    return text


def human_bytes(n: Any, unknown: str = "unknown") -> str:
    """Binary units, as operators read transfer sizes; None (not known) says `unknown`."""
    if n is None:
        return unknown
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
