"""replication.cfg import/export in the Proxmox section-config format (SPEC §2).

    local: 100-0
    <TAB>comment DR copy
    <TAB>target pve2
    <TAB>rate 10
    <TAB>schedule */5

Option order follows Proxmox's writer: comment, disable, the fixed option (target), then the
others sorted. The comment is URI-escaped like PVE::Tools::encode_text (control characters,
0x7f-0xff, ':' and '%'); replq also escapes leading/trailing white space, which the line
syntax would otherwise lose, so export → import → export is exact.
"""

from __future__ import annotations

import re
from typing import Any

from replq.errors import ValidationError
from replq.model import Job, format_rate, job_id_sort_key, parse_bool, parse_job_id, show

OPTION_ORDER = ("target", "rate", "remove_job", "schedule", "source")
KNOWN = ("comment", "disable", *OPTION_ORDER)
_HEADER_RE = re.compile(r"(\S+):\s*(\S+)\s*")
# Only ASCII blanks separate and trail (encode_text escapes those inside a comment), so a
# comment's own Unicode white space survives.
_OPTION_RE = re.compile(r"[ \t]+([^ \t]+)(?:[ \t]+(.*?))?[ \t]*")


def encode_text(text: str) -> str:
    out = re.sub(r"[\x00-\x1f\x7f-\xff:%]", lambda m: f"%{ord(m.group()):02X}", text)
    # White space at either end would be trimmed by the option syntax.
    lead = len(out) - len(out.lstrip(" "))
    trail = len(out) - len(out.rstrip(" "))
    if lead == len(out):
        return "%20" * len(out)
    return "%20" * lead + out[lead : len(out) - trail] + "%20" * trail


def decode_text(text: str) -> str:
    return re.sub(r"%([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def format_job(job: Job) -> str:
    lines = [f"local: {job.id}"]
    if job.comment:
        lines.append(f"\tcomment {encode_text(job.comment)}")
    if job.disable:
        lines.append("\tdisable")
    values: dict[str, Any] = {"target": job.target, "rate": format_rate(job.rate) if job.rate is not None else None,
                              "remove_job": job.remove_job, "schedule": job.schedule, "source": job.source}
    for key in OPTION_ORDER:
        if values[key] is not None:
            lines.append(f"\t{key} {values[key]}")
    return "\n".join(lines) + "\n"


def export_jobs(jobs: list[Job]) -> str:
    """All jobs, sorted by guest and job number, sections separated by a blank line."""
    return "\n".join(format_job(j) for j in sorted(jobs, key=lambda j: job_id_sort_key(j.id)))


def parse(text: str) -> list[Job]:
    """Parse a replication.cfg; every error names its line. Validates each job's own fields
    (not references to the cluster: the store checks those before writing)."""
    jobs: list[Job] = []
    seen: set[str] = set()
    section: dict[str, Any] | None = None
    start = 0

    def finish() -> None:
        nonlocal section
        if section is None:
            return
        sid = section.pop("__id")
        if "target" not in section:
            raise ValidationError(f"line {start}: job '{sid}': missing property 'target'")
        try:
            jobs.append(Job(id=sid, **section))
        except ValidationError as exc:
            raise ValidationError(f"line {start}: job '{sid}': {exc}") from None
        section = None

    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")  # a file edited on Windows; a comment's own CR is escaped
        if "\x00" in line:
            raise ValidationError(f"line {n}: contains a NUL character")
        if not line.strip():
            finish()
            continue
        if line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            finish()
            m = _HEADER_RE.fullmatch(line)
            if not m:
                raise ValidationError(f"line {n}: unable to parse section header '{show(line)}'")
            stype, sid = m.groups()
            if stype != "local":
                raise ValidationError(f"line {n}: unsupported job type '{show(stype)}' (only 'local')")
            try:
                parse_job_id(sid)
            except ValidationError as exc:
                raise ValidationError(f"line {n}: {exc}") from None
            if sid in seen:
                raise ValidationError(f"line {n}: duplicate job '{sid}'")
            seen.add(sid)
            section, start = {"__id": sid}, n
            continue
        if section is None:
            raise ValidationError(f"line {n}: option outside of a section")
        m = _OPTION_RE.fullmatch(line)
        if not m:
            raise ValidationError(f"line {n}: unable to parse option '{show(line)}'")
        key, value = m.groups()
        if key not in KNOWN:
            raise ValidationError(f"line {n}: unknown property '{show(key)}'")
        if key in section:
            raise ValidationError(f"line {n}: duplicate property '{key}'")
        if key == "disable":
            section[key] = True if not value else _bool(value, n)
        elif not value:
            raise ValidationError(f"line {n}: property '{key}' needs a value")
        else:
            section[key] = decode_text(value) if key == "comment" else value
    finish()
    return jobs


def _bool(value: str, n: int) -> bool:
    try:
        return parse_bool(value, "disable")
    except ValidationError as exc:
        raise ValidationError(f"line {n}: {exc}") from None
