"""Secrets never leave: a Redis URL's password appears in no output of any command, whether the
Redis is unreachable, refuses the credentials or the URL is malformed; `settings show` masks
the secrets among the cluster settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from replq.redact import mask_url, redact_url
from replq.store import Store
from tests.support.helpers import REPO, ok, run
from tests.support.redisproc import free_port

PASSWORD = "Sup3r-s3cret.pw"  # what must never show
QUOTED = "p%40ss%3Aw0rd-xyz"  # "p@ss:w0rd-xyz" in a URL
UNQUOTED = "p@ss:w0rd-xyz"

COMMANDS = [
    ["status"], ["list"], ["read", "100-0"], ["node", "list"], ["storage", "list"], ["guest", "list"],
    ["guest", "show", "100"], ["settings", "show"], ["settings", "set", "retry_interval", "900"],
    ["create-local-job", "100-0", "pve2"], ["update", "100-0", "--rate", "5"], ["delete", "100-0"],
    ["run", "--id", "100-0"], ["run", "--id", "100-0", "--dry-run"], ["log", "100-0"], ["schedule-now", "100-0"],
    ["migrate", "100", "pve2"], ["guest", "move", "100", "--to", "pve2"], ["config", "export"],
    ["config", "backup", "--state"],
    ["node", "add", "pve9", "--address", "10.0.0.9", "--host-key",
     "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"],
    ["worker", "--node", "pve1"], ["beat"],
]


def assert_no_secret(r: subprocess.CompletedProcess, *secrets: str) -> None:
    out = r.stdout + r.stderr
    for s in secrets:
        assert s not in out, (r.args, out)
    assert "Traceback" not in out, out


def urls(redis_port: int) -> dict[str, str]:
    dead = free_port()
    return {
        "unreachable": f"redis://replq:{PASSWORD}@127.0.0.1:{dead}/0",
        "unreachable, no user": f"redis://:{PASSWORD}@127.0.0.1:{dead}/0",
        "password in the query": f"redis://127.0.0.1:{dead}/0?password={PASSWORD}",
        "wrong credentials": f"redis://nosuchuser:{PASSWORD}@127.0.0.1:{redis_port}/0",
        "malformed": f"redis://:{PASSWORD}@127.0.0.1:notaport/0",
        "unknown scheme": f"rediss+x://:{PASSWORD}@127.0.0.1:{dead}/0",
    }


# Every kind of URL failure with a few commands; every command with the unreachable URL.
FEW = [["status"], ["settings", "show"], ["config", "backup"], ["run", "--id", "100-0"], ["worker", "--node", "pve1"]]


def test_no_command_prints_the_redis_password(redis_url: str, tmp_path: Path) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    backup = tmp_path / "backup.json"
    backup.write_text(json.dumps({"nodes": [], "storages": [], "guests": [], "jobs": [], "settings": {}}))
    kinds = {**urls(port), "quoted password": f"redis://u:{QUOTED}@127.0.0.1:{free_port()}/0"}
    cases = [(kind, via, args) for kind in kinds for via in ("--redis", "REPLQ_REDIS_URL")
             for args in (COMMANDS + [["config", "restore", str(backup)]] if kind == "unreachable" else FEW)]

    def attempt(case: tuple[str, str, list[str]]) -> tuple[tuple[str, str, list[str]], subprocess.CompletedProcess]:
        kind, via, args = case
        env = {k: v for k, v in os.environ.items() if k != "REPLQ_REDIS_URL"}
        prefix = ["--redis", kinds[kind]] if via == "--redis" else []
        if via == "REPLQ_REDIS_URL":
            env["REPLQ_REDIS_URL"] = kinds[kind]
        return case, subprocess.run([sys.executable, "-m", "replq", *prefix, *args], capture_output=True, text=True,
                                    timeout=120, env=env, cwd=REPO)

    with ThreadPoolExecutor(4) as pool:
        for case, r in pool.map(attempt, cases):
            assert r.returncode != 0, (case, r.stdout)
            assert r.stderr.count("\n") == 1, (case, r.stderr)
            assert_no_secret(r, PASSWORD, QUOTED, UNQUOTED)


def first_line(argv: list[str], tmp_path: Path) -> str:
    """The start line a service prints on stderr (the service is stopped once it printed it)."""
    log = tmp_path / "service.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=REPO,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and b"\n" not in log.read_bytes():
            time.sleep(0.1)
        return log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        proc.wait(30)


def test_service_start_lines_hide_the_password(redis_url: str, tmp_path: Path) -> None:
    url = redis_url.replace("redis://", f"redis://default:{PASSWORD}@")  # `default` has no password: accepted
    line = first_line([sys.executable, "-m", "replq", "--redis", url, "flower", "--port", str(free_port())], tmp_path)
    assert "replq flower: http://127.0.0.1:" in line and "broker redis://default:***@127.0.0.1:" in line, line
    assert PASSWORD not in line
    line = first_line([sys.executable, "-m", "replq", "--redis", url, "metrics", "--port", str(free_port())], tmp_path)
    assert "replq metrics: http://127.0.0.1:" in line and PASSWORD not in line, line


def test_redact_and_mask() -> None:
    assert redact_url("redis://replq:pw@10.0.0.1:6379/0") == "redis://replq:***@10.0.0.1:6379/0"
    assert redact_url("rediss://:pw@h/1?ssl_cert_reqs=none&password=pw") == \
        "rediss://:***@h/1?ssl_cert_reqs=none&password=***"
    assert redact_url("sentinel://:pw@h1:26379;sentinel://:pw@h2:26379?master=replq") == \
        "sentinel://:***@h1:26379;sentinel://:***@h2:26379?master=replq"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert mask_url("https://user:tok@hooks.example.test/services/T0/B0/XXXX?x=1") == "https://hooks.example.test/***"
    assert mask_url("http://receiver.example.test:8080/") == "http://receiver.example.test:8080/"


def test_settings_show_masks_secrets(redis_url: str) -> None:
    store = Store.from_url(redis_url)
    store.set_setting("flower_password", "flower-" + PASSWORD)
    store.set_setting("notify_url", "https://hooks.example.test/services/T0/B0/Tok3nValue?sig=abc")
    for fmt in ("text", "json", "yaml"):
        out = ok("settings", "show", "--output-format", fmt)
        assert PASSWORD not in out and "Tok3nValue" not in out and "sig=abc" not in out, out
    shown = json.loads(ok("settings", "show", "--output-format", "json"))
    assert shown["flower_password"] == "***"
    assert shown["notify_url"] == "https://hooks.example.test/***"
    assert run("settings", "show").returncode == 0


def test_sandbox_status_text_hides_the_password(tmp_path: Path) -> None:
    """The text is for eyes (and screenshots); the JSON and `sandbox env` are for programs and keep it."""
    from replq.sandbox import Sandbox

    sb = Sandbox(tmp_path / "sb")
    sb.dir.mkdir()
    url = f"redis://replq:{PASSWORD}@127.0.0.1:{free_port()}/0"
    sb.state = {"dir": str(sb.dir), "nodes": {}, "services": {}, "redis": {"url": url}}
    sb.save()
    text = ok("sandbox", "status", "--dir", str(sb.dir))
    assert "redis   redis://replq:***@127.0.0.1:" in text and PASSWORD not in text, text
    assert json.loads(ok("sandbox", "status", "--dir", str(sb.dir), "--output-format", "json"))["redis_url"] == url
    assert PASSWORD in ok("sandbox", "env", "--dir", str(sb.dir))
