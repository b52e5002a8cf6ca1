"""Calendar events: the schedule format of SPEC §4 (Proxmox/systemd style), its next events, job limits.

Pure module: the instant and the time zone are parameters. The next-event search is a port of
systemd's `find_next()` (src/shared/calendarspec.c) including its use of glibc `mktime()` to
normalise candidate times, so that daylight-saving changes are handled exactly like systemd
timers: a local time that does not exist is skipped, a repeated local hour is not repeated.
systemd's quirks only show in those hours, so we mirror its algorithm (and glibc's mktime
probing, which decides which of two equal wall-clock times wins) rather than reinvent it.
Verified against `systemd-analyze calendar` (systemd 252, glibc 2.36) in tests/test_calendar_systemd.py.

Where systemd gives up ("Infinite loop in calendar calculation", after which a systemd timer never
fires again) a plain wall-clock search answers instead, so a replication job keeps its schedule.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from replq.errors import CalendarError, ValidationError

MIN_YEAR = 1970
MAX_YEAR = 2199  # systemd's bound; also bounds the search for impossible dates like *-2-30
MAX_EXPRESSION_LEN = 1024  # parse is linear, but nobody needs more (a job schedule allows 128)
MAX_COMPONENTS = 240  # systemd's limit on the length of one component list
_MAX_CALENDAR_ITERATIONS = 1000  # systemd's safety valve
_USEC = 1_000_000

WEEKDAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_WEEKDAYS = {n.lower(): i for i, n in enumerate(WEEKDAY_NAMES)} | {
    n: i for i, n in enumerate(("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"))
}
_ALL_WEEKDAYS = 0x7F

# (start, stop, repeat) like systemd's CalendarComponent: stop -1 = open, repeat 0 = single value.
Component = tuple[int, int, int]
Chain = tuple[Component, ...]  # () = '*' (matches everything)

# field name, lowest, highest, start of '*/R'
_FIELDS = {
    "year": (MIN_YEAR, MAX_YEAR, MIN_YEAR),
    "month": (1, 12, 1),
    "day": (1, 31, 1),
    "hour": (0, 23, 0),
    "minute": (0, 59, 0),
    "second": (0, 59, 0),
}

_ZERO: Chain = ((0, -1, 0),)
_EVERY_SECOND: Chain = ((0, -1, 1),)  # systemd's '*' for seconds: matches whole seconds only


# ---------------------------------------------------------------------------------------------
# The parsed event
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalendarEvent:
    expression: str
    normalized: str
    weekdays: int  # bit 0 = Monday ... bit 6 = Sunday; 0x7F = any
    year: Chain
    month: Chain
    day: Chain
    hour: Chain
    minute: Chain
    second: Chain
    utc: bool = False

    def next_event(self, after: datetime, tz: str | tzinfo) -> datetime | None:
        """The first event strictly after `after` (aware; naive is read as wall time in tz)."""
        zone = _zone(tz)
        usec = _to_usec(after, zone)
        nxt = _next_usec(self, _clock(UTC if self.utc else zone), usec)
        if nxt is None:
            return None
        return datetime.fromtimestamp(nxt // _USEC, UTC if self.utc else zone).replace(microsecond=nxt % _USEC)

    def events(self, after: datetime, tz: str | tzinfo, count: int) -> list[datetime]:
        """Up to `count` consecutive events strictly after `after`."""
        zone = _zone(tz)
        clock = _clock(UTC if self.utc else zone)
        out_zone = UTC if self.utc else zone
        usec = _to_usec(after, zone)
        out: list[datetime] = []
        while len(out) < count:
            nxt = _next_usec(self, clock, usec)
            if nxt is None:
                break
            out.append(datetime.fromtimestamp(nxt // _USEC, out_zone).replace(microsecond=nxt % _USEC))
            usec = nxt
        return out

    def matches(self, when: datetime) -> bool:
        """Whether `when` (aware; wall time in its own zone) is an event time (ignores DST skipping)."""
        if self.utc:
            when = when.astimezone(UTC)
        if when.microsecond:
            return False
        if self.weekdays != _ALL_WEEKDAYS and not self.weekdays & (1 << when.weekday()):
            return False
        return all(
            _chain_has(chain, value)
            for chain, value in (
                (self.year, when.year),
                (self.month, when.month),
                (self.day, when.day),
                (self.hour, when.hour),
                (self.minute, when.minute),
                (self.second, when.second),
            )
        )


def _chain_has(chain: Chain, value: int) -> bool:
    if not chain:
        return True
    for start, stop, repeat in chain:
        if value == start:
            return True
        if repeat and value > start and (value - start) % repeat == 0 and (stop < 0 or value <= stop):
            return True
    return False


def chain_values(chain: Chain, field: str) -> list[int]:
    """All values of a component list within the field's bounds, sorted."""
    lo, hi, _ = _FIELDS[field]
    if not chain:
        return list(range(lo, hi + 1))
    values: set[int] = set()
    for start, stop, repeat in chain:
        if repeat == 0:
            values.add(start)
        else:
            values.update(range(start, (hi if stop < 0 else min(stop, hi)) + 1, repeat))
    return sorted(v for v in values if lo <= v <= hi)


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------

_KEYWORDS: dict[str, tuple[int, Chain, Chain, Chain, Chain, Chain]] = {
    # weekdays, month, day, hour, minute, second (year is always '*')
    "minutely": (_ALL_WEEKDAYS, (), (), (), (), _ZERO),
    "hourly": (_ALL_WEEKDAYS, (), (), (), _ZERO, _ZERO),
    "daily": (_ALL_WEEKDAYS, (), (), _ZERO, _ZERO, _ZERO),
    "weekly": (1, (), (), _ZERO, _ZERO, _ZERO),
    "monthly": (_ALL_WEEKDAYS, (), ((1, -1, 0),), _ZERO, _ZERO, _ZERO),
    "yearly": (_ALL_WEEKDAYS, ((1, -1, 0),), ((1, -1, 0),), _ZERO, _ZERO, _ZERO),
    "quarterly": (
        _ALL_WEEKDAYS,
        ((1, -1, 0), (4, -1, 0), (7, -1, 0), (10, -1, 0)),
        ((1, -1, 0),),
        _ZERO,
        _ZERO,
        _ZERO,
    ),
    "semiannually": (_ALL_WEEKDAYS, ((1, -1, 0), (7, -1, 0)), ((1, -1, 0),), _ZERO, _ZERO, _ZERO),
}
_KEYWORDS["annually"] = _KEYWORDS["yearly"]
_KEYWORDS["semi-annually"] = _KEYWORDS["semiannually"]

# A raw list item before its field is known: kind '*' or 'n', values and their positions.
_Item = tuple[str, int, int, int, int, int, int]  # kind, n, m, r, pos, pos_m, pos_r (-1 = absent)


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def fail(self, pos: int, why: str = "") -> CalendarError:
        rest = self.s[pos:]
        if len(rest) > 40:
            rest = rest[:40] + "..."
        rest = "".join(c if c.isprintable() else repr(c)[1:-1] for c in rest)  # stays one line
        return CalendarError(f"unable to parse calendar event at '{rest}'" + (f": {why}" if why else ""))

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def spaces(self) -> bool:
        j = self.i
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1
        return self.i > j

    def number(self) -> int | None:
        j = self.i
        while self.i < len(self.s) and self.s[self.i] in "0123456789":
            self.i += 1
        if self.i == j:
            return None
        if self.i - j > 9:
            raise self.fail(j, "number too large")
        return int(self.s[j : self.i])

    def weekdays(self) -> int:
        bits = 0
        while True:
            pos = self.i
            first = self._weekday_name()
            if self.s.startswith("..", self.i):
                self.i += 2
                last = self._weekday_name()
                d = first
                while True:  # a range may wrap: fri..mon
                    bits |= 1 << d
                    if d == last:
                        break
                    d = (d + 1) % 7
            else:
                bits |= 1 << first
            c = self.peek()
            if c == ",":
                self.i += 1
                continue
            if c in ("", " ", "\t"):
                return bits
            raise self.fail(pos if c.isalpha() else self.i)

    def _weekday_name(self) -> int:
        j = self.i
        while self.i < len(self.s) and self.s[self.i].isascii() and self.s[self.i].isalpha():
            self.i += 1
        name = self.s[j : self.i].lower()
        if name not in _WEEKDAYS:
            raise self.fail(j, "expected a weekday (mon..sun)" if name else "")
        return _WEEKDAYS[name]

    def items(self, terminators: str) -> list[_Item]:
        """A comma list of `*`, `*/R`, `N`, `N..M`, `N/R`, `N..M/R`."""
        out: list[_Item] = []
        while True:
            if len(out) >= MAX_COMPONENTS:
                raise self.fail(self.i, "too many values in one list")
            pos = self.i
            suffix = pos
            m = r = -1
            pos_m = pos_r = -1
            if self.peek() == "*":
                self.i += 1
                kind, n = "*", 0
            else:
                num = self.number()
                if num is None:
                    raise self.fail(pos)
                kind, n = "n", num
                if self.s.startswith("..", self.i):
                    suffix = self.i
                    self.i += 2
                    pos_m = self.i
                    num = self.number()
                    if num is None:
                        raise self.fail(suffix)
                    m = num
            if self.peek() == "/":
                suffix = self.i
                self.i += 1
                pos_r = self.i
                num = self.number()
                if num is None:
                    raise self.fail(suffix)
                r = num
                if r == 0 and not (kind == "*" and self.s[pos_r : self.i] == "00"):
                    if self.peek() in terminators + ",":
                        raise self.fail(suffix, "repetition must be greater than 0")
                    raise self.fail(suffix)
            c = self.peek()
            if c not in terminators + ",":
                raise self.fail(suffix if suffix != pos else self.i)
            out.append((kind, n, m, r, pos, pos_m, pos_r))
            if c != ",":
                return out
            self.i += 1

    def chain(self, items: list[_Item], field: str) -> Chain:
        lo, hi, star = _FIELDS[field]
        comps: list[Component] = []
        for kind, n, m, r, pos, pos_m, pos_r in items:
            if kind == "*":
                if r < 0:
                    return _EVERY_SECOND if field == "second" else ()
                if r == 0:  # the seed's '*/00': the field's first value only ("once per hour")
                    comps.append((star, -1, 0))
                    continue
                n = star
            elif not lo <= n <= hi:
                raise self.fail(pos, f"{field} {n} out of range {lo}..{hi}")
            if m >= 0:
                if not lo <= m <= hi:
                    raise self.fail(pos_m, f"{field} {m} out of range {lo}..{hi}")
                if m < n:
                    raise self.fail(pos, f"range {n}..{m} is backwards")
            if r > hi - lo:
                raise self.fail(pos_r, f"repetition {r} too large for {field}")
            if r < 0:
                r = 1 if m >= 0 else 0
            comps.append((n, m, r))
        if field == "second" and (0, -1, 1) in comps:
            return _EVERY_SECOND  # covers every other value; systemd prints such a list as '*'
        return _normalize_chain(comps, hi)


def _normalize_chain(comps: list[Component], hi: int) -> Chain:
    """systemd's normalize_chain(): trim ranges to whole steps, drop repeats that never fire, sort, dedup."""
    out: set[Component] = set()
    for start, stop, repeat in comps:
        if stop > start and repeat > 0:
            stop -= (stop - start) % repeat
        if (stop > start and repeat > 0 and start + repeat > stop) or start == stop:
            repeat, stop = 0, -1
        if stop < 0 and repeat > 0 and start + repeat > hi:
            repeat = 0  # SPEC: N/R stops at the field maximum; systemd refuses this form, we keep N
        out.add((start, stop, repeat))
    return tuple(sorted(out))


@functools.lru_cache(maxsize=4096)
def _parse(expr: str) -> CalendarEvent:
    text = expr.strip()
    p = _Parser(text)
    if not text:
        raise CalendarError("unable to parse calendar event at '': empty schedule")
    utc = False
    if len(text) > 3 and text[-3:].upper() == "UTC" and text[-4] in " \t":
        utc = True
        text = text[:-3].rstrip()
        p = _Parser(text)
    keyword = _KEYWORDS.get(text.lower())
    year: Chain = ()
    if keyword is not None:
        weekdays, month, day, hour, minute, second = keyword
    else:
        weekdays = _ALL_WEEKDAYS
        month = day = ()
        hour = minute = second = _ZERO
        have_date = False
        if p.peek().isalpha():
            weekdays = p.weekdays()
            p.spaces()
        if p.peek():
            first = p.items(":- \t")
            if p.peek() == "-":  # a date: [YEARS-]MONTHS-DAYS
                p.i += 1
                second_list = p.items("- \t")
                if p.peek() == "-":
                    p.i += 1
                    third = p.items(" \t")
                    year, month, day = p.chain(first, "year"), p.chain(second_list, "month"), p.chain(third, "day")
                else:
                    month, day = p.chain(first, "month"), p.chain(second_list, "day")
                have_date = True
                p.spaces()
                first = p.items(": \t") if p.peek() else []
            if first:  # the time: [HOURS:]MINUTES[:SECONDS]
                parts = [first]
                while p.peek() == ":" and len(parts) < 3:
                    p.i += 1
                    parts.append(p.items(": \t"))
                if len(parts) == 1:
                    hour, minute = (), p.chain(parts[0], "minute")
                else:
                    hour, minute = p.chain(parts[0], "hour"), p.chain(parts[1], "minute")
                    if len(parts) == 3:
                        second = p.chain(parts[2], "second")
            elif not have_date and weekdays == _ALL_WEEKDAYS:
                raise p.fail(p.i)
            p.spaces()
            if p.peek():
                raise p.fail(p.i)
    if weekdays in (0, _ALL_WEEKDAYS):
        weekdays = _ALL_WEEKDAYS
    ev = CalendarEvent(expr, "", weekdays, year, month, day, hour, minute, second, utc)
    return _with_normalized(ev)


def parse(expr: str) -> CalendarEvent:
    """Parse a calendar event (SPEC §4). Raises CalendarError only."""
    if not isinstance(expr, str):
        raise CalendarError(f"calendar event must be a string, not {type(expr).__name__}")
    if len(expr) > MAX_EXPRESSION_LEN:
        raise CalendarError(f"calendar event too long ({len(expr)} characters, at most {MAX_EXPRESSION_LEN})")
    if "\x00" in expr:
        raise CalendarError("unable to parse calendar event: contains a NUL character")
    return _parse(expr)


# ---------------------------------------------------------------------------------------------
# Normalised form (systemd's calendar_spec_to_string())
# ---------------------------------------------------------------------------------------------


def _format_chain(chain: Chain, width: int, seconds: bool = False) -> str:
    if not chain or (seconds and (0, -1, 1) in chain):
        return "*"
    parts = []
    for start, stop, repeat in chain:
        s = f"{start:0{width}d}"
        if stop > 0:
            s += f"..{stop:0{width}d}"
        if repeat > 0 and not (stop > 0 and repeat == 1):
            s += f"/{repeat}"
        parts.append(s)
    return ",".join(parts)


def _format_weekdays(bits: int) -> str:
    out: list[str] = []
    x = 0
    while x < 7:
        if bits & (1 << x):
            y = x
            while y + 1 < 7 and bits & (1 << (y + 1)):
                y += 1
            if y == x:
                out.append(WEEKDAY_NAMES[x])
            elif y == x + 1:
                out.append(f"{WEEKDAY_NAMES[x]},{WEEKDAY_NAMES[y]}")
            else:
                out.append(f"{WEEKDAY_NAMES[x]}..{WEEKDAY_NAMES[y]}")
            x = y + 1
        else:
            x += 1
    return ",".join(out)


def _with_normalized(ev: CalendarEvent) -> CalendarEvent:
    s = ""
    if ev.weekdays != _ALL_WEEKDAYS:
        s = _format_weekdays(ev.weekdays) + " "
    s += f"{_format_chain(ev.year, 4)}-{_format_chain(ev.month, 2)}-{_format_chain(ev.day, 2)} "
    s += f"{_format_chain(ev.hour, 2)}:{_format_chain(ev.minute, 2)}:{_format_chain(ev.second, 2, True)}"
    if ev.utc:
        s += " UTC"
    return CalendarEvent(
        ev.expression, s, ev.weekdays, ev.year, ev.month, ev.day, ev.hour, ev.minute, ev.second, ev.utc
    )


# ---------------------------------------------------------------------------------------------
# Time zones and a port of glibc mktime()
# ---------------------------------------------------------------------------------------------


def system_timezone() -> str:
    """The system's zone: TZ if it names a zone, else the /etc/localtime link, else /etc/timezone, else UTC."""
    candidates = []
    env = os.environ.get("TZ", "").lstrip(":")
    if env:
        candidates.append(env)
    try:
        link = os.readlink("/etc/localtime")
        if "zoneinfo/" in link:
            candidates.append(link.split("zoneinfo/", 1)[1])
    except OSError:
        pass
    try:
        with open("/etc/timezone", encoding="utf-8") as f:
            candidates.append(f.read().strip())
    except OSError:
        pass
    for name in candidates:
        try:
            _zone(name)
            return name
        except CalendarError:
            continue
    return "UTC"


@functools.lru_cache(maxsize=256)
def _zone_by_name(name: str) -> ZoneInfo:
    if not name or len(name) > 255 or "\x00" in name or name.startswith("/") or ".." in name.split("/"):
        raise CalendarError(f"unknown time zone '{name}'")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise CalendarError(f"unknown time zone '{name}'") from exc


def resolve_zone(tz: str | tzinfo) -> tzinfo:
    """A zone name (IANA) or tzinfo as a tzinfo; CalendarError for an unknown zone."""
    return _zone(tz)


def _zone(tz: str | tzinfo) -> tzinfo:
    if isinstance(tz, str):
        return _zone_by_name(tz)
    if isinstance(tz, tzinfo):
        return tz
    raise CalendarError(f"time zone must be a name or tzinfo, not {type(tz).__name__}")


def _to_usec(when: datetime, zone: tzinfo) -> int:
    if not isinstance(when, datetime):
        raise CalendarError(f"expected a datetime, not {type(when).__name__}")
    if when.tzinfo is None or when.utcoffset() is None:
        when = when.replace(tzinfo=zone)
    return (when - _EPOCH) // timedelta(microseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAYS_BEFORE_MONTH = (0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334)


def _is_leap(y: int) -> bool:
    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


def _days_in_month(y: int, m0: int) -> int:
    if m0 == 1:
        return 29 if _is_leap(y) else 28
    return (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)[m0]


def _days_from_civil(y: int, m0: int, d: int) -> int:
    """Days since 1970-01-01 of year y, month m0 (0-based, in range), day d (any integer)."""
    yy = y - 1
    days = 365 * yy + yy // 4 - yy // 100 + yy // 400 - 719162
    days += _DAYS_BEFORE_MONTH[m0] + (1 if m0 > 1 and _is_leap(y) else 0)
    return days + d - 1


def _civil_from_days(z: int) -> tuple[int, int, int]:
    """(year, month0, day) of a day number since 1970-01-01 (H. Hinnant's algorithm)."""
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (y + 1 if m <= 2 else y), m - 1, d


class _Clock:
    """localtime()/mktime() of one zone, with glibc's probing (and its offset guess) in mktime."""

    def __init__(self, zone: tzinfo) -> None:
        self.zone = zone
        self.fixed = zone is UTC
        self._memo: dict[int, tuple[int, int] | None] = {}

    def convert(self, t: int) -> tuple[int, int]:
        """(local wall time as seconds since the epoch, isdst) of the instant t."""
        if self.fixed:
            return t, 0
        bucket = t // 3600
        hit = self._memo.get(bucket, False)
        if hit is False:
            a = self._exact(bucket * 3600)
            b = self._exact(bucket * 3600 + 3599)
            hit = a if a == b else None  # a change inside this hour: look up each instant
            if len(self._memo) > 100_000:
                self._memo.clear()
            self._memo[bucket] = hit
        if hit is None:
            off, dst = self._exact(t)
            return t + off, dst
        return t + hit[0], hit[1]

    def _exact(self, t: int) -> tuple[int, int]:
        dt = datetime.fromtimestamp(t, self.zone)
        off = dt.utcoffset()
        dst = dt.dst()
        return (off // timedelta(seconds=1) if off else 0), (1 if dst else 0)


@functools.lru_cache(maxsize=256)
def _clock(zone: tzinfo) -> _Clock:
    return _Clock(zone)


class _State:
    """One find_next() run: the mktime offset guess (glibc keeps it in a static) and the last result."""

    __slots__ = ("clock", "guess", "last", "last_wday", "last_isdst")

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.guess = 0
        self.last: tuple[int, int, int, int, int, int] | None = None
        self.last_wday = 0
        self.last_isdst = 0

    def mktime(
        self, y: int, mon: int, mday: int, hour: int, minute: int, sec: int, isdst: int
    ) -> tuple[int, tuple[int, int, int, int, int, int], int, int] | None:
        """glibc __mktime_internal(): (t, normalised fields, isdst, weekday Mon=0) or None."""
        y += mon // 12
        mon %= 12
        in_range = 1 <= mday <= 28 or 1 <= mday <= _days_in_month(y, mon)
        sec_requested = sec
        s = 0 if sec < 0 else 59 if sec > 59 else sec
        lreq = _days_from_civil(y, mon, mday) * 86400 + hour * 3600 + minute * 60 + s
        convert = self.clock.convert
        t0 = lreq + self.guess
        t = t1 = t2 = t0
        dst2 = 0
        probes = 6
        while True:
            lt, tm_isdst = convert(t)
            dt = lreq - lt
            if dt == 0:
                break
            if t == t1 and t != t2 and (dst2 <= tm_isdst if isdst < 0 else (isdst != 0) != (tm_isdst != 0)):
                break  # oscillating around a spring-forward gap: take this one (glibc's choice)
            probes -= 1
            if probes == 0:
                return None
            t1, t2, t, dst2 = t2, t, t + dt, tm_isdst
        if dt == 0 and isdst >= 0 and (isdst != 0) != (tm_isdst != 0):
            # The wall time exists but with the other isdst: use a neighbour's offset (glibc heuristic).
            stride, bound = 601200, 536454000 // 2 + 601200
            found = False
            for delta in range(stride, bound, stride):
                for direction in (-1, 1):
                    ot = t + delta * direction
                    olt, oisdst = convert(ot)
                    if (isdst != 0) == (oisdst != 0):
                        t = ot + (lreq - olt)
                        lt, tm_isdst = convert(t)
                        found = True
                        break
                if found:
                    break
            if not found:
                return None
        self.guess = t - lreq  # glibc: *offset = t - t0 + old guess
        exact = lt == lreq
        if sec_requested != lt % 60:
            t += sec_requested - s
            lt, tm_isdst = convert(t)
            exact = False
        days, rem = divmod(lt, 86400)
        wday = (days + 3) % 7
        if exact and in_range and 0 <= hour <= 23 and 0 <= minute <= 59:
            fields = (y, mon, mday, hour, minute, sec_requested)
            # Calling mktime() again on these fields would change nothing, not even the guess.
            self.last, self.last_wday, self.last_isdst = fields, wday, tm_isdst
        else:
            yy, mm, dd = _civil_from_days(days)
            fields = (yy, mm, dd, rem // 3600, rem // 60 % 60, rem % 60)
            self.last = None
        return t, fields, tm_isdst, wday


def _match(chain: Chain, val: int) -> int | None:
    """systemd find_matching_component(): the earliest value >= val, or None."""
    if not chain:
        return val
    d = -1
    for start, stop, repeat in chain:
        if start >= val:
            if d < 0 or start < d:
                d = start
        elif repeat > 0:
            k = start + repeat * (-((start - val) // repeat))
            if (d < 0 or k < d) and (stop < 0 or k <= stop):
                d = k
    return d if d >= 0 else None


@functools.lru_cache(maxsize=4096)
def _seconds_usec(chain: Chain) -> Chain:
    """The seconds chain in microseconds, as systemd matches it (so a fraction moves to the next second)."""
    return tuple((a * _USEC, b * _USEC if b >= 0 else -1, r * _USEC) for a, b, r in chain)


_END_USEC = (_days_from_civil(MAX_YEAR + 1, 0, 2) * 86400) * _USEC  # 2200-01-02 00:00 UTC
_LOOP = "loop"  # systemd gave up: "Infinite loop in calendar calculation"


def _next_usec(ev: CalendarEvent, clock: _Clock, usec: int) -> int | None:
    """The first event strictly after usec (µs since the epoch), or None when there is none.

    systemd's algorithm can give up ("Infinite loop in calendar calculation") when a candidate is
    normalised into a spring-forward gap; a systemd timer then stops firing. A replication job
    must not, so in that case the answer comes from a plain wall-clock search instead.
    """
    if usec >= _END_USEC:  # nothing can follow the end of MAX_YEAR (and far times overflow datetime)
        return None
    usec = max(usec, -1)  # systemd counts from the epoch (usec_t is unsigned)
    nxt = _systemd_next_usec(ev, clock, usec)
    if nxt == _LOOP or (isinstance(nxt, int) and nxt <= usec):  # never hand the scheduler a stuck answer
        return _wallclock_next_usec(ev, clock, usec)
    return nxt  # type: ignore[return-value]


def _systemd_next_usec(ev: CalendarEvent, clock: _Clock, usec: int) -> int | str | None:
    """systemd calendar_spec_next_usec(): the first event after usec, None (no more), or _LOOP."""
    usec += 1
    t = usec // _USEC
    tm_usec = usec % _USEC
    st = _State(clock)
    lt, isdst = clock.convert(t)
    days, rem = divmod(lt, 86400)
    y, mo, d = _civil_from_days(days)
    c = [y, mo, d, rem // 3600, rem // 60 % 60, rem % 60]
    found = _find_next(ev, st, c, isdst, tm_usec)
    if found is None or found == _LOOP:
        return found
    fields, tm_usec, isdst = found  # type: ignore[misc]
    res = st.mktime(*fields, isdst)
    if res is None:
        return None
    return res[0] * _USEC + tm_usec


_FALLBACK_DAYS = 4 * 366
_MAX_BACKWARDS = 3 * 3600


def _wallclock_next_usec(ev: CalendarEvent, clock: _Clock, usec: int) -> int | None:
    """Scan wall-clock dates and times in order; a missing local time is skipped, a repeated one
    fires at its first occurrence after `usec`. Only used where systemd's search gives up."""
    after = usec // _USEC  # events are whole seconds: the first one > usec is the first one > after
    lt, _ = clock.convert(after)
    lower = lt - _MAX_BACKWARDS  # wall time never runs back further than a fall-back change
    hours = chain_values(ev.hour, "hour")
    minutes = chain_values(ev.minute, "minute")
    seconds = chain_values(ev.second, "second")
    best = best_local = None
    for day in range(lower // 86400, lower // 86400 + _FALLBACK_DAYS):
        y, m0, d = _civil_from_days(day)
        if y > MAX_YEAR or (best_local is not None and day * 86400 > best_local + _MAX_BACKWARDS):
            break
        if not (
            _chain_has(ev.year, y)
            and _chain_has(ev.month, m0 + 1)
            and _chain_has(ev.day, d)
            and ev.weekdays & (1 << ((day + 3) % 7))
        ):
            continue
        for h in hours:
            if day * 86400 + h * 3600 + 3599 < lower:
                continue
            for mi in minutes:
                base = day * 86400 + h * 3600 + mi * 60
                if base + 59 < lower:
                    continue
                for s in seconds:
                    local = base + s
                    if local < lower:
                        continue
                    if best_local is not None and local > best_local + _MAX_BACKWARDS:
                        return best * _USEC  # type: ignore[operator]
                    for probe in (local - 86400, local + 86400):  # the offsets in force around it
                        cand = local - (clock.convert(probe)[0] - probe)
                        if clock.convert(cand)[0] == local and cand > after and (best is None or cand < best):
                            best, best_local = cand, local
    if best is not None:
        return best * _USEC
    return None


def _find_next(
    ev: CalendarEvent, st: _State, c: list[int], isdst: int, tm_usec: int
) -> tuple[tuple[int, int, int, int, int, int], int, int] | str | None:
    """A port of systemd's find_next() (v249+): c = [year, month0, mday, hour, min, sec]."""
    mktime = st.mktime
    seconds = _seconds_usec(ev.second)
    start, start_usec = (c[0], c[1], c[2], c[3], c[4], c[5]), tm_usec
    invalidate_dst = False
    weekdays = ev.weekdays

    def within(c: list[int]) -> int:
        """tm_within_bounds(): 1 = fine, 0 = normalised forward (c updated), -1 = error/backwards."""
        nonlocal isdst
        if c[0] > MAX_YEAR:
            return -1
        key = (c[0], c[1], c[2], c[3], c[4], c[5])
        if key == st.last and (isdst < 0 or isdst == st.last_isdst):  # mktime() would change nothing
            return 1
        res = mktime(c[0], c[1], c[2], c[3], c[4], c[5], isdst)
        if res is None:
            return -1
        t = list(res[1])
        if t[0] != c[0]:
            cmp = t[0] - c[0]
            t[1] = 0
        elif t[1] != c[1]:
            cmp = t[1] - c[1]
            t[2] = 1
        elif t[2] != c[2]:
            cmp = t[2] - c[2]
            t[3] = 0
        elif t[3] != c[3]:
            cmp = t[3] - c[3]
            t[4] = 0
        elif t[4] != c[4]:
            cmp = t[4] - c[4]
            t[5] = 0
        else:
            cmp = t[5] - c[5]
        if cmp < 0:
            return -1
        if cmp > 0:
            c[:] = t
            isdst = res[2]
            return 0
        return 1

    for _ in range(_MAX_CALENDAR_ITERATIONS):
        res = mktime(c[0], c[1], c[2], c[3], c[4], c[5], isdst)
        if res is not None:
            c[:] = res[1]
            if invalidate_dst:
                isdst = res[2]
        if not invalidate_dst:
            isdst = -1

        v = _match(ev.year, c[0])
        if v is None:
            return None
        if v != c[0]:
            c[:] = [v, 0, 1, 0, 0, 0]
            tm_usec = 0
        if within(c) <= 0:
            return None

        v = _match(ev.month, c[1] + 1)
        r = 1
        if v is not None:
            if v - 1 != c[1]:
                c[1:] = [v - 1, 1, 0, 0, 0]
                tm_usec = 0
            r = within(c)
        if v is None or r < 0:
            c[:] = [c[0] + 1, 0, 1, 0, 0, 0]
            tm_usec = 0
            continue
        if r == 0:
            continue

        v = _match(ev.day, c[2])
        if v is not None:
            if v != c[2]:
                c[2:] = [v, 0, 0, 0]
                tm_usec = 0
            r = within(c)
        if v is None or r < 0:
            c[1:] = [c[1] + 1, 1, 0, 0, 0]
            tm_usec = 0
            continue
        if r == 0:
            continue

        if weekdays != _ALL_WEEKDAYS:
            if tuple(c) == st.last and (isdst < 0 or isdst == st.last_isdst):
                wday = st.last_wday
            else:
                wres = mktime(c[0], c[1], c[2], c[3], c[4], c[5], isdst)
                wday = -1 if wres is None else wres[3]
            if wday < 0 or not weekdays & (1 << wday):
                c[2:] = [c[2] + 1, 0, 0, 0]
                tm_usec = 0
                continue

        v = _match(ev.hour, c[3])
        if v is not None:
            if v != c[3]:
                c[3:] = [v, 0, 0]
                tm_usec = 0
            r = within(c)
        if v is None or r < 0:
            c[2:] = [c[2] + 1, 0, 0, 0]
            tm_usec = 0
            continue
        if r == 0:
            continue

        v = _match(ev.minute, c[4])
        if v is not None:
            if v != c[4]:
                c[4:] = [v, 0]
                tm_usec = 0
            r = within(c)
        if v is None or r < 0:
            c[3:] = [c[3] + 1, 0, 0]
            tm_usec = 0
            continue
        if r == 0:
            continue

        v = _match(seconds, c[5] * _USEC + tm_usec)
        if v is not None:
            c[5], tm_usec = divmod(v, _USEC)
            r = within(c)
        if v is None or r < 0:
            c[4:] = [c[4] + 1, 0]
            tm_usec = 0
            continue
        if r == 0:
            continue
        found = (c[0], c[1], c[2], c[3], c[4], c[5])
        if found < start or (found == start and start_usec >= tm_usec + 1):
            # Stuck (a backwards normalisation in a negative-DST zone such as Europe/Dublin): step an
            # hour and let mktime() pick the DST side from now on (systemd PR #36897, in Debian 252).
            invalidate_dst = True
            c[3] += 1
            continue
        return found, tm_usec, isdst
    return _LOOP  # systemd: "Infinite loop in calendar calculation"


def next_event_epoch(ev: CalendarEvent | str, after_epoch: float, tz: str | tzinfo) -> float | None:
    """For the scheduler: the first event strictly after `after_epoch` (seconds), or None."""
    if isinstance(ev, str):
        ev = parse(ev)
    zone = UTC if ev.utc else _zone(tz)
    if not isinstance(after_epoch, int | float) or not math.isfinite(after_epoch):
        raise CalendarError(f"invalid instant {after_epoch!r}")
    usec = round(after_epoch * _USEC)
    nxt = _next_usec(ev, _clock(zone), usec)
    return None if nxt is None else nxt / _USEC


# ---------------------------------------------------------------------------------------------
# Job limits (the seed: at most once a minute, at least once a week)
# ---------------------------------------------------------------------------------------------

_CYCLE_START = 11323  # 2001-01-01: 2001..2028 holds every kind of year and month boundary
_CYCLE_DAYS = 10227  # 28 years, a whole number of weeks


@functools.lru_cache(maxsize=1024)
def _job_limit_problem(ev: CalendarEvent) -> str | None:
    seconds = chain_values(ev.second, "second")
    if len(seconds) > 1:
        return (
            f"fires more than once a minute ({len(seconds)} times, seconds {_format_chain(ev.second, 2, True)}); "
            "a job may run at most once a minute"
        )
    years = chain_values(ev.year, "year")
    if ev.year and len(years) != MAX_YEAR - MIN_YEAR + 1:
        return (
            f"names specific years ({_format_chain(ev.year, 4)}), so it stops firing after {years[-1]}; "
            "a job must run at least every 7 days"
        )
    months = set(chain_values(ev.month, "month"))
    days = set(chain_values(ev.day, "day"))
    prev = first = -1
    gap = 0
    for n in range(_CYCLE_START, _CYCLE_START + _CYCLE_DAYS):
        y, m0, d = _civil_from_days(n)
        if m0 + 1 in months and d in days and ev.weekdays & (1 << ((n + 3) % 7)):
            if prev >= 0:
                gap = max(gap, n - prev)
            else:
                first = n
            prev = n
    if prev < 0:
        return "never fires (no date matches it); a job must run at least every 7 days"
    gap = max(gap, first + _CYCLE_DAYS - prev)
    if gap >= 8:  # 8 calendar days apart is more than 7 days whatever the times of day
        return f"leaves gaps of up to {gap} days between events (wall clock); a job must run at least every 7 days"
    return _year_end_gap(ev)


def _year_end_gap(ev: CalendarEvent) -> str | None:
    """systemd's arithmetic can skip the first days of January when a day repetition runs past
    December 31 (`*-*/7`: Dec 29, then Jan 8). Walk the real events over every kind of year end."""
    if not any(repeat and stop < 0 for _, stop, repeat in ev.day):
        return None
    clock = _clock(UTC)
    worst: tuple[int, int, int] | None = None
    for year in range(2001, 2029):
        t = (_days_from_civil(year, 11, 20) * 86400 - 1) * _USEC
        end = _days_from_civil(year + 1, 0, 25)
        prev = -1
        while True:
            nxt = _next_usec(ev, clock, t)
            if nxt is None:
                break
            day = nxt // _USEC // 86400
            if prev >= 0 and (worst is None or day - prev > worst[0]):
                worst = (day - prev, prev, day)
            if day > end:
                break
            prev = day
            t = ((day + 1) * 86400 - 1) * _USEC  # on to the next day with an event
    if worst is None or worst[0] < 8:
        return None
    gap, a, b = worst
    (ya, ma, da), (yb, mb, db) = _civil_from_days(a), _civil_from_days(b)
    return (
        f"leaves gaps of up to {gap} days between events (wall clock): the day repetition runs past December 31, "
        f"so after {ya}-{ma + 1:02d}-{da:02d} the next event is {yb}-{mb + 1:02d}-{db:02d} (as with systemd); "
        "a job must run at least every 7 days"
    )


def job_limit_problem(ev: CalendarEvent, tz: str | tzinfo | None = None) -> str | None:
    """None if a replication job may use this schedule, else why not (naming the limit).

    Gaps are measured in wall-clock time from the expression itself, so `weekly` stays fine across a
    daylight-saving change (and tz does not change the answer; it is accepted for symmetry).
    """
    if tz is not None:
        _zone(tz)
    return _job_limit_problem(ev)


def validate_job_schedule(expr: str, tz: str | tzinfo | None = None) -> CalendarEvent:
    """Parse a job's schedule and apply the job limits; raises ValidationError (CalendarError to parse)."""
    ev = parse(expr)
    problem = job_limit_problem(ev, tz)
    if problem:
        raise ValidationError(f"schedule '{expr}' is not allowed for a replication job: it {problem}")
    return ev
