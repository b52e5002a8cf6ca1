"""replication.cfg import/export in the Proxmox section-config format (SPEC §2).

    local: 100-0
    <TAB>comment DR copy
    <TAB>target pve2
    <TAB>rate 10
    <TAB>schedule */5

As PVE::SectionConfig writes it (pve-common src/PVE/SectionConfig.pm write_config): comment,
disable (a bare line), the fixed option (target), then the others sorted; only options that are
set (an unset schedule stays unset: the default `*/15` applies); sections in file order (new ones
appended), each followed by a blank line. The comment is PVE::Tools::encode_text'ed: UTF-8
encoded, then every byte outside printable ASCII, and ':' and '%', %-escaped (`Büro` →
`B%C3%BCro`); decode_text reverses it. replq also escapes white space at either end of a comment
(as %20), which the line syntax would otherwise lose, so export → import → export is exact.
"""

from __future__ import annotations

import re
from typing import Any

from replq.errors import ValidationError
from replq.model import Job, format_rate, parse_bool, parse_job_id, show, trusted

OPTION_ORDER = ("target", "rate", "remove_job", "schedule", "source")
KNOWN = ("comment", "disable", *OPTION_ORDER)
_HEADER_RE = re.compile(r"(\S+):\s*(\S+)\s*")
# Only ASCII blanks separate and trail (encode_text escapes those inside a comment), so a
# comment's own Unicode white space survives.
_OPTION_RE = re.compile(r"[ \t]+([^ \t]+)(?:[ \t]+(.*?))?[ \t]*")
# encode_text's unsafe bytes: all but 0x20-0x24, 0x26-0x39, 0x3b-0x7e (not '%', not ':').
_UNSAFE = re.compile(rb"[^\x20-\x24\x26-\x39\x3b-\x7e]")


def encode_text(text: str) -> str:
    """PVE::Tools::encode_text: uri_escape(encode('utf8', text), unsafe), plus blank ends as %20."""
    out = _UNSAFE.sub(lambda m: b"%%%02X" % m.group()[0], text.encode("utf-8")).decode("ascii")
    # White space at either end would be trimmed by the option syntax.
    lead = len(out) - len(out.lstrip(" "))
    trail = len(out) - len(out.rstrip(" "))
    if lead == len(out):
        return "%20" * len(out)
    return "%20" * lead + out[lead : len(out) - trail] + "%20" * trail


def decode_text(text: str) -> str:
    """PVE::Tools::decode_text: decode('utf8', uri_unescape(text)). A byte that is not part of
    valid UTF-8 reads as the Latin-1 character of that code (replq's exports before issue 16
    escaped 0x80-0xff that way); Proxmox's files are always valid UTF-8."""
    raw = re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8"))
    return re.sub("[\udc80-\udcff]", lambda m: chr(ord(m.group()) - 0xDC00), raw.decode("utf-8", "surrogateescape"))


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
    """The jobs in the order given (the store's file order), each section followed by a blank line."""
    return "".join(format_job(j) + "\n" for j in jobs)


def parse(text: str) -> list[Job]:
    """Parse a replication.cfg into its jobs, in file order; every error names its line. Validates
    each job's own fields (not references to the cluster: the store checks those before writing),
    a schedule only as a calendar event: a schedule outside replq's job limits is the caller's to
    report (pvesr has none)."""
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
            job = trusted(Job, id=sid, **section)
            job.validate(schedule_limits=False)  # the job limits are the importer's to report
            jobs.append(job)
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
