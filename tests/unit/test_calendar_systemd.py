"""Differential tests: replq's calendar events against the real `systemd-analyze calendar`.

Expressions are generated as structures and rendered twice, independently of replq's parser:
once in the Proxmox form replq accepts (`*/5`, `*-05`, `fri..mon`, one time component = minutes)
and once in systemd's syntax (`*:00/5:00`, `*-*-05`, an explicit weekday list). Each systemd call
previews many expressions from one base instant (TZ set in its environment), with --iterations.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from replq.calendar import _LOOP, _clock, _systemd_next_usec, next_event_epoch, parse, resolve_zone

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")

ITERATIONS = 12
PER_CALL = 40

BOUNDS = {"year": (2025, 2031), "month": (1, 12), "day": (1, 31), "hour": (0, 23), "minute": (0, 59), "second": (0, 59)}
DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
FULL = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
KEYWORDS = [
    "minutely",
    "hourly",
    "daily",
    "weekly",
    "monthly",
    "yearly",
    "annually",
    "quarterly",
    "semiannually",
    "semi-annually",
]


@dataclass
class Case:
    proxmox: str
    systemd: str


def num(rnd: random.Random, n: int) -> str:
    return f"{n:02d}" if rnd.random() < 0.3 else str(n)


def component(rnd: random.Random, field: str) -> tuple[str, str]:
    """One comma list in both syntaxes."""
    lo, hi = BOUNDS[field]
    top = 2199 if field == "year" else hi  # the field's real maximum (repetitions run up to it)
    star_start = 1 if field in ("month", "day") else 0
    px: list[str] = []
    sd: list[str] = []
    star = False
    for _ in range(rnd.choice([1, 1, 1, 2, 3])):
        kind = rnd.randrange(8)
        n = rnd.randint(lo, hi)
        if field == "year" and kind == 1:
            kind = 2
        if kind == 0:
            px.append("*")
            star = True
        elif kind == 1:  # */R
            r = rnd.randint(1, min(hi - lo, 20))
            px.append(f"*/{r}")
            sd.append(f"{star_start}/{r}" if star_start + r <= top else str(star_start))
        elif kind in (2, 3):
            px.append(num(rnd, n))
            sd.append(str(n))
        elif kind == 4:
            m = rnd.randint(n, min(hi, n + 12))
            px.append(f"{num(rnd, n)}..{num(rnd, m)}")
            sd.append(f"{n}..{m}" if m > n or field != "second" else str(n))  # systemd refuses seconds N..N
        elif kind == 5:  # N/R: N, N+R, ... up to the maximum (systemd refuses N+R > max: then it is just N)
            r = rnd.randint(1, min(hi - lo, 25))
            px.append(f"{num(rnd, n)}/{r}")
            sd.append(f"{n}/{r}" if n + r <= top else str(n))
        elif kind == 6:
            m = rnd.randint(n, hi)
            r = rnd.randint(1, min(hi - lo, 15))
            px.append(f"{num(rnd, n)}..{num(rnd, m)}/{r}")
            sd.append(f"{n}..{m}/{r}")
        else:
            px.append(num(rnd, n))
            sd.append(str(n))
    if field == "minute" and rnd.random() < 0.05:
        return "*/00", "00"  # the seed's "once per hour"
    return ",".join(px), ("*" if star else ",".join(sd))


def weekdays(rnd: random.Random) -> tuple[str, str]:
    bits: set[int] = set()
    parts = []
    for _ in range(rnd.choice([1, 1, 2, 3])):
        a = rnd.randrange(7)
        names = FULL if rnd.random() < 0.2 else DAYS
        style = rnd.choice([str.lower, str.upper, str.capitalize])
        if rnd.random() < 0.5:
            b = rnd.randrange(7)
            parts.append(f"{style(names[a])}..{style(names[b])}")
            d = a
            while True:  # Proxmox ranges may wrap around the week
                bits.add(d)
                if d == b:
                    break
                d = (d + 1) % 7
        else:
            parts.append(style(names[a]))
            bits.add(a)
    return ",".join(parts), ",".join(DAYS[d].capitalize() for d in sorted(bits))


def generate(rnd: random.Random) -> Case:
    utc = " UTC" if rnd.random() < 0.15 else ""
    if rnd.random() < 0.08:
        kw = rnd.choice(KEYWORDS)
        return Case(kw + utc, kw + utc)
    px: list[str] = []
    wd_sd = ""
    if rnd.random() < 0.3:
        wpx, wd_sd = weekdays(rnd)
        px.append(wpx)
    date_sd = "*-*-*"
    if rnd.random() < 0.4:
        mpx, msd = component(rnd, "month")
        dpx, dsd = component(rnd, "day")
        if rnd.random() < 0.25:
            ypx, ysd = component(rnd, "year")
            px.append(f"{ypx}-{mpx}-{dpx}")
            date_sd = f"{ysd}-{msd}-{dsd}"
        else:
            px.append(f"{mpx}-{dpx}")
            date_sd = f"*-{msd}-{dsd}"
    time_sd = "00:00:00"
    kind = rnd.randrange(4) if px else rnd.randrange(1, 4)
    if kind == 1:
        mpx, msd = component(rnd, "minute")
        px.append(mpx)
        time_sd = f"*:{msd}:00"
    elif kind == 2:
        hpx, hsd = component(rnd, "hour")
        mpx, msd = component(rnd, "minute")
        px.append(f"{hpx}:{mpx}")
        time_sd = f"{hsd}:{msd}:00"
    elif kind == 3:
        hpx, hsd = component(rnd, "hour")
        mpx, msd = component(rnd, "minute")
        spx, ssd = component(rnd, "second")
        px.append(f"{hpx}:{mpx}:{spx}")
        time_sd = f"{hsd}:{msd}:{ssd}"
    sd = f"{wd_sd} {date_sd} {time_sd}".strip()
    return Case(" ".join(px) + utc, sd + utc)


def systemd_preview(cases: list[Case], base: int, tz: str) -> list[tuple[str, list[int]] | None]:
    """(normalized form, event epochs) per case, None where systemd failed to compute the events."""
    env = dict(os.environ, TZ=tz, LC_ALL="C", SYSTEMD_COLORS="0", SYSTEMD_PAGER="", SYSTEMD_LOG_COLOR="0")
    proc = subprocess.run(
        [
            SYSTEMD_ANALYZE,
            "calendar",
            f"--base-time=@{base}",
            f"--iterations={ITERATIONS}",
            *[c.systemd for c in cases],
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert "Failed to parse" not in proc.stderr, proc.stderr
    failed = set()
    for line in proc.stderr.splitlines():
        if line.startswith("Failed to determine next elapse for '"):
            failed.add(line.split("'")[1])
    blocks: list[tuple[str, list[str]]] = []
    for line in proc.stdout.splitlines():
        s = line.strip()
        if s.startswith("Normalized form:"):
            blocks.append((s.split(":", 1)[1].strip(), []))
        elif s.startswith(("Next elapse:", "Iter. #")):
            value = s.split(":", 1)[1].strip()
            if value != "never":
                blocks[-1][1].append(value)
        elif s.startswith("(in UTC):"):
            blocks[-1][1][-1] = s.split(":", 1)[1].strip()
    out: list[tuple[str, list[int]] | None] = []
    it = iter(blocks)
    for case in cases:
        if case.systemd in failed:
            out.append(None)
            continue
        normalized, stamps = next(it)
        epochs = [int(datetime.strptime(v, "%a %Y-%m-%d %H:%M:%S UTC").replace(tzinfo=UTC).timestamp()) for v in stamps]
        out.append((normalized, epochs))
    assert next(it, None) is None
    return out


def raw_events(expr: str, base: int, tz: str) -> list[int] | str:
    """Events from the systemd port itself (no fallback), or _LOOP where it gives up."""
    ev = parse(expr)
    clock = _clock(resolve_zone("UTC") if ev.utc else resolve_zone(tz))
    out: list[int] = []
    usec = base * 1_000_000
    for _ in range(ITERATIONS):
        nxt = _systemd_next_usec(ev, clock, usec)
        if nxt == _LOOP:
            return _LOOP
        if nxt is None:
            break
        assert isinstance(nxt, int) and nxt % 1_000_000 == 0
        out.append(nxt // 1_000_000)
        usec = nxt
    return out


def at(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


BASES = [
    # daylight saving in Berlin: spring forward 2026-03-29 01:00Z, fall back 2026-10-25 01:00Z
    ("Europe/Berlin", at("2026-03-29 00:00:00")),
    ("Europe/Berlin", at("2026-03-29 00:59:30")),
    ("Europe/Berlin", at("2026-03-28 22:30:00")),
    ("Europe/Berlin", at("2026-10-25 00:00:00")),
    ("Europe/Berlin", at("2026-10-25 00:59:59")),
    ("Europe/Berlin", at("2026-10-25 01:30:00")),
    ("Europe/Berlin", at("2026-10-24 23:00:00")),
    ("Europe/Berlin", at("2027-03-27 12:00:00")),
    ("Europe/Berlin", at("2026-12-31 22:59:30")),  # local year end
    ("Europe/Berlin", at("2028-02-29 22:30:00")),  # local leap day end
    # New York: spring forward 2026-03-08 07:00Z, fall back 2026-11-01 06:00Z
    ("America/New_York", at("2026-03-08 06:30:00")),
    ("America/New_York", at("2026-03-08 07:00:00")),
    ("America/New_York", at("2026-03-07 20:00:00")),
    ("America/New_York", at("2026-11-01 05:00:00")),
    ("America/New_York", at("2026-11-01 05:59:59")),
    ("America/New_York", at("2026-11-01 06:30:00")),
    ("America/New_York", at("2027-01-01 04:59:00")),  # local year end
    ("America/New_York", at("2026-04-30 23:30:00")),
    # negative DST (winter time is the "DST" in tzdata): systemd once hung here (PR #36897)
    ("Europe/Dublin", at("2025-03-29 22:00:00")),
    ("Europe/Dublin", at("2025-03-30 00:00:00")),
    ("Europe/Dublin", at("2025-10-26 00:30:00")),
    # UTC: month, year ends and leap days
    ("UTC", at("2028-02-28 23:59:00")),
    ("UTC", at("2028-02-29 12:00:00")),
    ("UTC", at("2026-12-31 23:59:59")),
    ("UTC", at("2027-02-28 23:30:00")),
    ("UTC", at("2026-06-30 23:59:30")),
    ("UTC", at("2100-02-28 12:00:00")),  # not a leap year
]


@pytest.mark.parametrize(("tz", "base"), BASES, ids=[f"{tz}@{b}" for tz, b in BASES])
@pytest.mark.parametrize("variant", [0, 1])
def test_events_match_systemd(tz: str, base: int, variant: int) -> None:
    rnd = random.Random(f"{tz}/{base}/{variant}")
    if variant:
        base += rnd.randint(-3 * 3600, 3 * 3600)
    cases = [generate(rnd) for _ in range(PER_CALL)]
    reference = systemd_preview(cases, base, tz)
    checked = loops = 0
    for case, ref in zip(cases, reference, strict=True):
        mine = raw_events(case.proxmox, base, tz)
        if ref is None:  # systemd gave up ("Infinite loop in calendar calculation"): so must the port
            assert mine == _LOOP, (case, mine)
            loops += 1
        else:
            normalized, events = ref
            assert parse(case.proxmox).normalized == normalized, case
            assert mine == events, (case, tz, base)
            checked += 1
        # the public API agrees with systemd wherever systemd has an answer, and always moves forward
        got: list[int] = []
        t: float | None = base
        for _ in range(ITERATIONS):
            t = next_event_epoch(case.proxmox, t, tz)
            if t is None:
                break
            got.append(int(t))
        if ref is not None:
            assert got == ref[1], case
        else:
            assert got == sorted(set(got)) and all(g > base for g in got)
    assert checked >= PER_CALL // 2, loops


def test_keywords_and_examples_normalize_like_systemd() -> None:
    exprs = {
        # Proxmox form -> the same schedule in systemd's syntax
        "*/5": "*:0/5",
        "*-05": "*-*-05",
        "mon..fri": "Mon..Fri",
        "sat..sun": "Sat..Sun",
        "mon,wed,fri": "Mon,Wed,Fri",
        "12:05": "12:05",
        "mon..wed 30/10": "Mon..Wed *:30/10",
        "mon..fri 8..17,22:0/15": "Mon..Fri 8..17,22:0/15",
        "fri 12..13:5/20": "Fri 12..13:5/20",
        "12/2:5": "12/2:5",
        "*": "*:*",
        "sat *-1..7 15:00": "Sat *-1..7 15:00",
        "2015-10-21": "2015-10-21",
        "*/00": "*:00",
        "fri..mon": "Fri..Sun,Mon",
        **{k: k for k in KEYWORDS},
    }
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "calendar", "--base-time=@1767225600", *exprs.values()],
        capture_output=True,
        text=True,
        env=dict(os.environ, TZ="UTC", LC_ALL="C"),
        timeout=60,
    )
    normalized = [line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if "Normalized form:" in line]
    assert [parse(p).normalized for p in exprs] == normalized
