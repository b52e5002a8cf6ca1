"""replication.cfg format: Proxmox layout, escaping, exact round trip, errors by line (SPEC §2)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replq.cfgfile import decode_text, encode_text, export_jobs, parse
from replq.errors import ValidationError
from replq.model import Job

SPEC_SAMPLE = "local: 100-0\n\tcomment DR copy\n\ttarget pve2\n\trate 10\n\tschedule */5\n\tsource pve1\n\n"


def test_spec_sample_parses_and_writes_back_identically() -> None:
    jobs = parse(SPEC_SAMPLE)
    assert jobs == [Job("100-0", "pve2", schedule="*/5", rate=10, comment="DR copy", source="pve1")]
    assert export_jobs(jobs) == SPEC_SAMPLE


def test_layout_as_section_config_writes_it() -> None:
    # PVE::SectionConfig::write_config: sections in file order, comment, disable (bare), the fixed
    # option, the set optional ones sorted; every section followed by a blank line; an unset
    # schedule is not written.
    jobs = [Job("200-1", "b", disable=True, remove_job="local", schedule="*/5"), Job("100-10", "c", rate=2.5),
            Job("100-2", "a", comment="x", rate=12.0, source="n1")]
    text = export_jobs(jobs)
    assert text == ("local: 200-1\n\tdisable\n\ttarget b\n\tremove_job local\n\tschedule */5\n\n"
                    "local: 100-10\n\ttarget c\n\trate 2.5\n\n"
                    "local: 100-2\n\tcomment x\n\ttarget a\n\trate 12\n\tsource n1\n\n")
    assert [j.id for j in parse(text)] == ["200-1", "100-10", "100-2"]
    assert export_jobs(parse(text)) == text


@pytest.mark.parametrize("comment", ["a:b", "100%", "line1\nline2\ttab", " lead and trail  ", "  ", "é ✓ ü",
                                     "%41 literal", "x" * 4096, "\x7f\x01", "ÿ:%", "\u3000wide\u3000",
                                     "a\u2028b\u0085"])
def test_comment_escaping_round_trip(comment: str) -> None:
    job = Job("100-0", "pve2", comment=comment)
    text = export_jobs([job])
    body = text.split("\n")[1]
    assert body.startswith("\tcomment ") and "\n" not in body and ":" not in body.split(" ", 1)[1]
    assert parse(text) == [job]
    assert export_jobs(parse(text)) == text
    assert decode_text(encode_text(comment)) == comment


def test_crlf_lines_accepted() -> None:
    assert parse(SPEC_SAMPLE.replace("\n", "\r\n")) == parse(SPEC_SAMPLE)


def test_pve_encoding_compatible() -> None:
    assert encode_text("DR: 50%\n") == "DR%3A 50%25%0A"
    assert decode_text("DR%3A 50%25%0A") == "DR: 50%\n"


# PVE::Tools::encode_text = uri_escape(Encode::encode("utf8", $text), "^\x20-\x24\x26-\x39\x3b-\x7e"):
# the UTF-8 bytes of every character outside printable ASCII, and ':' and '%', as %XX (upper case).
@pytest.mark.parametrize(("text", "encoded"), [
    ("Büro", "B%C3%BCro"),
    ("DR-Kopie → pve2: täglich", "DR-Kopie %E2%86%92 pve2%3A t%C3%A4glich"),
    ("Ωmega ✓ 😀", "%CE%A9mega %E2%9C%93 %F0%9F%98%80"),
    ("tab\there\x7f", "tab%09here%7F"),
    ("a#b$c&d'e;f<g>h~i", "a#b$c&d'e;f<g>h~i"),
])
def test_comment_encoding_as_section_config(text: str, encoded: str) -> None:
    assert encode_text(text) == encoded
    assert decode_text(encoded) == text
    assert decode_text(re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), encoded)) == text  # either case


def test_decode_of_bytes_that_are_not_utf8() -> None:
    # Proxmox never writes such; replq's earlier exports escaped Latin-1 code points (%FC for ü).
    assert decode_text("B%FCro %E2%9C%93") == "Büro ✓"


def test_proxmox_file_with_non_ascii_comments_round_trip() -> None:
    # As pvesr writes it: order kept, schedule absent where never set, comment UTF-8 %-escaped.
    text = ("local: 105-0\n\tcomment Sicherung B%C3%BCro%3A t%C3%A4glich\n\ttarget pve2\n\tschedule 22:30\n"
            "\tsource pve1\n\n"
            "local: 100-1\n\tcomment %E6%97%A5%E6%9C%AC %F0%9F%98%80\n\tdisable\n\ttarget pve3\n\trate 2.5\n\n")
    jobs = parse(text)
    assert [(j.id, j.comment, j.schedule) for j in jobs] == [
        ("105-0", "Sicherung Büro: täglich", "22:30"), ("100-1", "日本 😀", None)]
    assert export_jobs(jobs) == text


def test_proxmox_written_file_without_schedule_and_comments() -> None:
    text = "# written by PVE\nlocal: 100-0\n\ttarget pve2\n\tdisable 1\n\nlocal: 101-0\n    target pve3\n"
    jobs = parse(text)
    assert jobs[0].schedule is None and jobs[0].effective_schedule == "*/15"
    assert jobs[0].disable and jobs[1].target == "pve3"
    assert "schedule" not in export_jobs(jobs)


def test_schedules_outside_the_job_limits_parse() -> None:
    # pvesr accepts them; the importer warns (replq.cli.config), the file still parses.
    jobs = parse("local: 100-0\n\ttarget a\n\tschedule sat *-1..7 15:00\n\n"
                 "local: 101-0\n\ttarget a\n\tschedule *:*:0/10\n")
    assert [j.schedule for j in jobs] == ["sat *-1..7 15:00", "*:*:0/10"]


@pytest.mark.parametrize("text,message", [
    ("local: 100-01\n\ttarget a\n", "line 1: invalid replication job id"),
    ("local: 99-0\n\ttarget a\n", "reserved"),
    ("remote: 100-0\n\ttarget a\n", "line 1: unsupported job type"),
    ("local: 100-0\n\tschedule */5\n", "missing property 'target'"),
    ("local: 100-0\n\ttarget a\n\tbogus 1\n", "line 3: unknown property"),
    ("local: 100-0\n\ttarget a\n\ttarget b\n", "line 3: duplicate property"),
    ("local: 100-0\n\ttarget a\n\nlocal: 100-0\n\ttarget b\n", "line 4: duplicate job"),
    ("\ttarget a\n", "line 1: option outside"),
    ("local: 100-0\n\ttarget a\n\trate 0.1\n", "line 1: job '100-0': rate"),
    ("local: 100-0\n\ttarget a\n\tschedule */0\n", "line 1: job '100-0': "),
    ("local: 100-0\n\ttarget a;b\n", "target node name"),
    ("local: 100-0\n\ttarget\n", "needs a value"),
    ("local: 100-0\n\ttarget  \n", "needs a value"),
    ("garbage line\n", "line 1: unable to parse section header"),
    ("local: 100-0\n\ttarget a\x00\n", "NUL"),
])
def test_parse_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        parse(text)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=300),
       st.sampled_from([None, 1.0, 2.5, 1e3, 123.456]), st.booleans())
def test_round_trip_property(comment: str, rate: float | None, disable: bool) -> None:
    job = Job("100-0", "pve2", comment=comment, rate=rate, disable=disable, source="pve1")
    text = export_jobs([job])
    assert parse(text) == [job]
    assert export_jobs(parse(text)) == text
