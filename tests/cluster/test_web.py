"""The web GUI in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright) against
`replq web` on the session's sandbox, with a real beat and a real worker on the guest's node.

An operator logs in, adds a job on the datacenter panel (the id is assigned), finds it on the
node's and the guest's panels, watches beat and the worker sync it, schedules it now and watches
the row turn to a new last sync with status OK, opens its log, edits its schedule (an invalid
one shows the CLI's message), disables it and removes it (the worker cleans up the replica).

A screenshot of each panel is kept under $REPLQ_TEST_ARTIFACTS/web (default: pytest's
temporary directory, whose path the test prints).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from replq.sandbox import Sandbox
from replq.sandbox.services import free_port
from tests.support.cluster import POOL, Runtime
from tests.support.helpers import REPO, stop_procs, wait_for

pytestmark = pytest.mark.sandbox

CHROMIUM = "/usr/bin/chromium"
# As root in a machine without network: no sandbox, and none of Chromium's own connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
USER, PASSWORD = "operator", "browser-test-pw"
VMID = 1500  # this module's VMIDs: 1500-1509
SYNC_TIMEOUT = 90_000  # ms: beat's tick, the worker's run of a 2 MiB guest, on a loaded 2-core machine


@pytest.fixture(scope="module")
def rt(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """Beat and one worker (the guest's node1; the target needs none) on the session's sandbox."""
    r = Runtime(sandbox, range(VMID, VMID + 10), tmp_path_factory.mktemp("web-logs"), {})
    try:
        r.guest(VMID, "node1", mb=2)
        r.start_beat()
        r.start_worker("node1")
        yield r
    finally:
        r.stop_all()
        r.cleanup()


@pytest.fixture(scope="module")
def web(rt: Runtime) -> Iterator[str]:
    """`replq web` as an operator starts it, pointed at the sandbox; yields its URL."""
    port = free_port()
    env = {**os.environ, **rt.sb.env(), "PYTHONPATH": REPO, "REPLQ_WEB_USER": USER, "REPLQ_WEB_PASSWORD": PASSWORD}
    with open(rt.logdir / "web.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "replq", "web", "--port", str(port)], env=env, cwd=REPO,
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(lambda: proc.poll() is not None or urllib.request.urlopen(url, timeout=2).status == 200, 30,
                 "replq web to answer", ignore=(OSError,))
        assert proc.poll() is None, rt.log("web.log")
        yield url
    finally:
        stop_procs([proc])


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = os.environ.get("REPLQ_TEST_ARTIFACTS")
    path = Path(base) / "web" if base else tmp_path_factory.mktemp("web-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"\nweb GUI screenshots: {path}")
    return path


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 700})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield pg
    finally:
        context.close()
    assert not errors, f"the page raised: {errors}"


def log_in(page: Page, url: str, password: str = PASSWORD) -> None:
    page.goto(url)
    page.get_by_label("User", exact=True).fill(USER)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Log in", exact=True).click()


def row(page: Page, job_id: str) -> Locator:
    return page.get_by_role("row").filter(has=page.get_by_role("cell", name=job_id, exact=True))


def cell(page: Page, job_id: str, column: str) -> Locator:
    headers = [h.strip() for h in page.locator("#jobs thead th").all_inner_texts()]
    return row(page, job_id).get_by_role("cell").nth(headers.index(column))


def button(page: Page, name: str) -> Locator:
    return page.get_by_role("button", name=name, exact=True)


def test_a_wrong_password_is_refused_at_the_login_form(web: str, page: Page) -> None:
    log_in(page, web, password="not-the-password")
    expect(page.get_by_role("alert").first).to_have_text("login failed: wrong user or password")
    expect(page.get_by_role("heading", name="Replication — Datacenter")).to_be_hidden()


def test_an_operator_manages_a_job_in_the_browser(web: str, rt: Runtime, page: Page, artifacts: Path) -> None:
    job = f"{VMID}-0"
    log_in(page, web)
    expect(page.get_by_role("heading", name="Replication — Datacenter")).to_be_visible()

    # Add on the datacenter panel, by keyboard: the job number is assigned, the target excludes
    # the guest's node, the schedule's next events show as it is typed.
    button(page, "Add").focus()
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_label("Guest", exact=True)).to_be_focused()
    page.keyboard.type(str(VMID))
    page.keyboard.press("Tab")
    target = dialog.get_by_label("Target", exact=True)
    expect(target).to_be_focused()
    assert target.locator("option").all_inner_texts() == ["node2", "node3"]
    expect(target).to_have_value("node2")
    page.keyboard.press("Tab")
    schedule = dialog.get_by_label("Schedule", exact=True)
    expect(schedule).to_be_focused()
    expect(schedule).to_have_value("*/15")
    schedule.fill("")
    page.keyboard.type("*/5")
    expect(dialog.locator("#schedule-preview")).to_contain_text("Next: ")
    dialog.get_by_label("Rate limit (MB/s)", exact=True).fill("50")
    dialog.get_by_label("Comment", exact=True).fill("from the browser")
    expect(dialog.get_by_label("Enabled", exact=True)).to_be_checked()
    expect(dialog.get_by_role("button", name="Create", exact=True)).to_be_visible()
    page.keyboard.press("Enter")  # submits the form: Create
    expect(dialog).to_be_hidden()
    expect(cell(page, job, "Target")).to_have_text("node2")
    expect(cell(page, job, "Comment")).to_have_text("from the browser")
    assert rt.store.get_job(job).rate == 50
    page.screenshot(path=artifacts / "datacenter.png")

    # The node's panel and the guest's panel show it; another node's panel does not.
    page.get_by_role("link", name="node2", exact=True).click()
    expect(page.get_by_role("heading", name="Replication — node node2")).to_be_visible()
    expect(row(page, job)).to_have_count(0)  # other modules' guests may live there: only ours is checked
    page.get_by_role("link", name="node1", exact=True).click()
    expect(page.get_by_role("heading", name="Replication — node node1")).to_be_visible()
    expect(row(page, job)).to_be_visible()
    page.screenshot(path=artifacts / "node.png")
    page.get_by_role("link", name=str(VMID), exact=True).click()
    expect(page.get_by_role("heading", name=f"Replication — guest {VMID}")).to_be_visible()

    # A new job is due at once: beat and the worker sync it, and the row shows it by itself
    # (last sync is recorded while the run still cleans up: status OK comes after it).
    expect(cell(page, job, "Last sync")).not_to_have_text("-", timeout=SYNC_TIMEOUT)
    expect(cell(page, job, "Status")).to_have_text("OK", timeout=SYNC_TIMEOUT)
    first = cell(page, job, "Last sync").inner_text()
    page.get_by_label(f"Select job {job}").focus()
    page.keyboard.press("Space")

    # Schedule now: the row turns to a newer last sync, status OK, and stays selected meanwhile.
    button(page, "Schedule now").click()
    expect(cell(page, job, "Last sync")).not_to_have_text(first, timeout=SYNC_TIMEOUT)
    expect(cell(page, job, "Status")).to_have_text("OK", timeout=SYNC_TIMEOUT)
    assert cell(page, job, "Last sync").inner_text() > first
    expect(page.get_by_label(f"Select job {job}")).to_be_checked()
    assert rt.exists("node2", f"{POOL}/subvol-{VMID}-disk-0")
    page.screenshot(path=artifacts / "guest.png")

    # The log of the last run.
    button(page, "Log").click()
    log = page.get_by_role("dialog")
    expect(log.get_by_role("heading")).to_have_text(f"Log: replication job {job}")
    expect(log.locator("pre")).to_contain_text("start replication job")
    expect(log.locator("pre")).to_contain_text("end replication job")
    log.get_by_role("button", name="Close", exact=True).click()
    expect(log).to_be_hidden()

    # Edit: an invalid schedule is refused inline in the CLI's words; a valid one is saved.
    button(page, "Edit").click()
    edit = page.get_by_role("dialog")
    expect(edit.get_by_label("Guest", exact=True)).to_have_value(str(VMID))
    expect(edit.get_by_label("Schedule", exact=True)).to_have_value("*/5")
    edit.get_by_label("Schedule", exact=True).fill("*/0")
    edit.get_by_role("button", name="OK", exact=True).click()
    cli = rt.host("update", job, "--schedule", "*/0")
    assert cli.returncode == 1
    expect(edit.locator("#job-error")).to_have_text(cli.stderr.strip().removeprefix("replq: "))
    edit.get_by_label("Schedule", exact=True).fill("*/30")
    edit.get_by_role("button", name="OK", exact=True).click()
    expect(edit).to_be_hidden()
    expect(cell(page, job, "Schedule")).to_have_text("*/30")

    # Disable, then remove: the worker deletes the replica and the job leaves the table.
    button(page, "Disable").click()
    expect(cell(page, job, "Enabled")).to_have_text("No")
    expect(button(page, "Enable")).to_be_enabled()
    expect(button(page, "Disable")).to_be_disabled()
    assert rt.store.get_job(job).disable is True
    button(page, "Remove").click()
    remove = page.get_by_role("dialog")
    expect(remove.get_by_role("radio", name=re.compile("^Full removal"))).to_be_checked()
    remove.get_by_role("button", name="Remove", exact=True).click()
    expect(remove).to_be_hidden()
    expect(row(page, job)).to_have_count(0, timeout=SYNC_TIMEOUT)
    assert rt.store.job_ids(VMID) == []
    assert not rt.exists("node2", f"{POOL}/subvol-{VMID}-disk-0")
