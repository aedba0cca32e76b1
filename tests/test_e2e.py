"""End to end: a real Streamlit server, a real headless Chromium, real runs of the default model.

New experiment (baseline + RTN int8, tiny measurement) -> Experiments until both are done ->
Compare -> the share URL opened in a fresh browser context shows the same comparison.
"""
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from core import jobs
from core.assets import default_model_dir
from core.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.model]

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = "/tmp/slimlm_compare.png"
RUN_TIMEOUT_S = 300
LABELS = ["baseline fp32", "RTN int8 per-channel sym"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("streamlit did not become healthy")


@pytest.fixture
def server(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found (install Debian's chromium)")
    if not (default_model_dir() / "config.json").exists():
        pytest.skip(f"default model not converted yet ({default_model_dir()}); run scripts/setup.sh")
    pytest.importorskip("playwright.sync_api")
    data = tmp_path / "data"
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],  # no reruns when files change under the test
        cwd=REPO, env=dict(os.environ, SLIMLM_DATA=str(data)), stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url, data
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if (data / "slimlm.sqlite").exists():  # don't leave workers behind when the test failed
            store = Store(data / "slimlm.sqlite")
            for run in store.list():
                if not run.finished:
                    jobs.cancel(run.id, store)


def _set_number(page, label: str, value: int) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_timeout(300)


def _launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"])


def _new_page(browser, height: int):
    """A page 1500 px wide with 90 s timeouts: the first page load probes bitsandbytes (imports torch), slow on a
    busy machine."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1500, "height": height})
    page.set_default_timeout(90_000)
    expect.set_options(timeout=90_000)
    return page


def test_submit_wait_compare_share(server):
    from playwright.sync_api import expect, sync_playwright

    url, data = server
    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = _new_page(browser, 1600)

            # New experiment: baseline + RTN int8 per-channel, tiny measurement. Start at "/" (it
            # redirects to /new): a fresh server's first session opened on a non-default page shows a
            # spurious "Page not found" dialog (streamlit/streamlit#9992).
            page.goto(url)
            expect(page).to_have_url(f"{url}/new")
            expect(page.get_by_role("button", name="Run 3 experiments")).to_be_visible()
            page.get_by_role("checkbox", name="RTN int4 g64", exact=True).uncheck(force=True)
            expect(page.get_by_role("button", name="Run 2 experiments")).to_be_visible()
            for label, value in [("Evaluation windows", 2), ("Window length (tokens)", 64),
                                 ("Prompt length (tokens)", 8), ("Decode steps", 2), ("Warm-up repeats", 0),
                                 ("Timed repeats", 1), ("Tokens per sample", 4)]:
                _set_number(page, label, value)
            page.get_by_role("button", name="Run 2 experiments").click()
            expect(page.get_by_text("Submitted 2 experiments")).to_be_visible()
            runs = Store(data / "slimlm.sqlite").list()
            assert {r.label for r in runs} == set(LABELS)
            assert all(r.experiment.measure.eval_windows == 2 and r.experiment.measure.window_len == 64 for r in runs)
            ids = {r.id for r in runs}

            # Experiments: the page polls by itself until both runs are done
            page.get_by_role("link", name="Experiments: progress of all runs").click()
            done = page.get_by_role("button", name="Compare all done runs (2)")
            failed = page.get_by_text("Errors of failed runs")
            deadline = time.time() + RUN_TIMEOUT_S
            while not done.is_visible():
                if failed.is_visible():
                    errors = {r.label: r.error for r in Store(data / "slimlm.sqlite").list()}
                    pytest.fail(f"a run failed: {errors}")
                assert time.time() < deadline, "runs did not finish in time"
                page.wait_for_timeout(1000)

            # Compare both, then read the share URL
            done.click()
            expect(page.locator('[data-testid="stPlotlyChart"]')).to_have_count(2)
            page.get_by_text("Share this comparison").click()
            share = page.locator('[data-testid="stCode"]').first.inner_text().strip()
            assert re.match(rf"^{re.escape(url)}/compare\?runs=", share), share
            assert ids == set(re.search(r"runs=([^&]+)", share).group(1).split(","))
            page.wait_for_timeout(1500)  # let plotly finish drawing before the screenshot
            page.screenshot(path=SCREENSHOT, full_page=True)

            # The share URL in a fresh context (no cookies, no session) reproduces the comparison
            fresh = browser.new_context(viewport={"width": 1500, "height": 1600}).new_page()
            fresh.set_default_timeout(60_000)
            fresh.goto(share)
            charts = fresh.locator('[data-testid="stPlotlyChart"]')
            expect(charts).to_have_count(2)
            for label in LABELS:
                expect(fresh.locator('[data-testid="stMultiSelect"]').get_by_text(label).first).to_be_visible()
                expect(charts.first.locator("text", has_text=label).first).to_be_attached()
            assert set(re.search(r"runs=([^&]+)", fresh.url).group(1).replace("%2C", ",").split(",")) == ids
        finally:
            browser.close()


def test_distillation_in_the_browser(server):
    """New experiment with a distillation step (RTN int4 student of the default model, a few steps) -> Run detail
    shows the live training curve while it runs, then the recovered gap."""
    from playwright.sync_api import expect, sync_playwright

    url, data = server
    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = _new_page(browser, 2200)
            page.goto(url)
            expect(page.get_by_role("button", name="Run 3 experiments")).to_be_visible()
            for name in ("Baseline (no compression)", "RTN int8 per-channel", "RTN int4 g64"):
                page.get_by_role("checkbox", name=name, exact=True).uncheck(force=True)
            page.get_by_role("checkbox", name="Knowledge distillation (train the compressed model to match the original)").check(force=True)
            student = page.get_by_role("radio", name="RTN int4 g64", exact=True)
            expect(student).to_be_enabled()  # after the rerun that the checkbox started
            student.check(force=True)
            for label, value in [("Steps", 4), ("Windows per step", 1), ("Evaluate every (steps)", 2),
                                 ("Training windows", 8), ("Time budget (s, 0 = none)", 0),
                                 ("Evaluation windows", 2), ("Window length (tokens)", 64),
                                 ("Prompt length (tokens)", 8), ("Decode steps", 2), ("Warm-up repeats", 0),
                                 ("Timed repeats", 1), ("Tokens per sample", 4)]:
                _set_number(page, label, value)
            page.get_by_role("button", name="Run 1 experiment").click()
            expect(page.get_by_text("Submitted 1 experiment")).to_be_visible()
            (run,) = Store(data / "slimlm.sqlite").list()
            assert [s.method for s in run.experiment.steps] == ["rtn", "distill"]
            assert run.experiment.steps[1].max_steps == 4 and run.experiment.steps[1].micro_batch == 1

            page.get_by_role("link", name=re.compile(r"Distil .*\(run ")).click()
            expect(page.get_by_role("heading", name="Distillation")).to_be_visible()
            deadline = time.time() + RUN_TIMEOUT_S
            while not page.get_by_text("Gap recovered").is_visible():
                current = Store(data / "slimlm.sqlite").get(run.id)
                if current.status == "failed":
                    pytest.fail(f"the run failed: {current.error}")
                assert time.time() < deadline, "the distillation run did not finish in time"
                page.wait_for_timeout(1000)
            expect(page.get_by_text("Held-out perplexity").first).to_be_attached()
            assert page.locator('[data-testid="stPlotlyChart"]').count() >= 2  # loss and held-out curves
            done = Store(data / "slimlm.sqlite").get(run.id)
            assert done.status == "done" and done.metrics["distill"][0]["train"]["steps"] == 4
        finally:
            browser.close()
