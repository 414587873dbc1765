"""A real Chromium: JupyterLab runs the quickstart and its panel; the rendered quickstart reads offline.

Chromium comes from Debian (`apt-get install chromium`, done by `make setup` as root and by .ci/run);
Playwright drives it. The screenshots land in test-output/browser/.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "test-output" / "browser"
CHROMIUM = os.environ.get("COREML_LAB_CHROMIUM", "/usr/bin/chromium")  # make test CHROMIUM=... sets it
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need_chromium():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; `make test` does as root)")


@pytest.fixture
def jupyterlab(tmp_path):
    _need_chromium()
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / "00_quickstart.ipynb", root)
    port = _free_port()
    token = "coreml-lab-test"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--allow-root"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}/api?token={token}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(proc.stdout.read().decode(errors="replace")[-3000:])
            time.sleep(1)
    yield base, token
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_quickstart_runs_in_jupyterlab_and_the_button_fills_the_dashboard(jupyterlab):
    from playwright.sync_api import expect, sync_playwright

    base, token = jupyterlab
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{base}/lab/tree/00_quickstart.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=120_000)
            select = page.locator(".jp-Dialog button", has_text="Select")
            try:  # a fresh JupyterLab asks which kernel to start
                select.first.click(timeout=15_000)
            except Exception:  # noqa: BLE001 - no dialog: the kernel started on its own
                pass
            expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first).to_be_visible(
                timeout=120_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").click()
            page.locator(".lm-Menu-itemLabel").get_by_text("Run All Cells", exact=True).click()
            # the panel renders, and its first run (from the notebook cell) fills the summary
            button = page.locator("button", has_text="Convert and diagnose")
            expect(button).to_be_visible(timeout=240_000)
            summary = page.locator("pre.cl-summary").first
            expect(summary).to_contain_text("coreml_lab diagnosis", timeout=240_000)
            expect(summary).to_contain_text("fp16")
            # change an option in the panel and click the button
            page.locator(".widget-toggle-button", has_text="fp32").first.click()
            button.first.click()
            expect(summary).to_contain_text("fp32, target", timeout=240_000)
            expect(summary).to_contain_text("close to PyTorch")
            expect(page.locator(".widget-html", has_text="done").first).to_be_visible(timeout=60_000)
            news = page.locator(".jp-toast-button", has_text="No")
            if news.count():
                news.first.click()
            page.locator(".lm-TabBar-tabLabel", has_text="Per-layer error").first.click()
            plot = page.locator(".widget-tab .jp-OutputArea-output img").first
            expect(plot).to_be_visible(timeout=60_000)
            box = plot.bounding_box()
            assert box and box["width"] > 300 and box["height"] > 150
            plot.scroll_into_view_if_needed()
            page.screenshot(path=str(OUT / "quickstart_dashboard.png"), full_page=False)
        except Exception:
            page.screenshot(path=str(OUT / "quickstart_failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert (OUT / "quickstart_dashboard.png").stat().st_size > 10_000


def test_rendered_quickstart_shows_the_dashboard_with_networking_off(tmp_path):
    """`make report`'s page needs no network: the panel, its tabs and the dashboard's figures draw offline."""
    from playwright.sync_api import expect, sync_playwright

    sys.path.insert(0, str(ROOT / "tools"))
    import render_notebooks

    _need_chromium()
    src = tmp_path / "nb"
    src.mkdir()
    shutil.copy(ROOT / "notebooks" / "00_quickstart.ipynb", src)
    html = render_notebooks.render(src / "00_quickstart.ipynb", tmp_path / "reports")
    OUT.mkdir(parents=True, exist_ok=True)
    refused, errors = [], []

    def offline(route):
        if route.request.url.startswith(("file:", "data:", "blob:")):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort("internetdisconnected")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1300, "height": 1000})
        context.route("**/*", offline)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            page.goto(html.as_uri())
            panel = page.locator(".widget-tab").first
            expect(panel).to_be_visible(timeout=60_000)
            expect(page.locator("button", has_text="Convert and diagnose")).to_be_visible()
            expect(page.locator("pre.cl-summary").first).to_contain_text("coreml_lab diagnosis")
            page.locator(".lm-TabBar-tabLabel", has_text="Per-layer error").first.click()
            plot = panel.locator(".jp-OutputArea-output img").first
            expect(plot).to_be_visible(timeout=30_000)
            plot.scroll_into_view_if_needed()
            sizes = panel.locator("img").evaluate_all("imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
            box = plot.bounding_box()
            page.screenshot(path=str(OUT / "offline_quickstart.png"))
        except Exception:
            page.screenshot(path=str(OUT / "offline_quickstart_failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert len(sizes) >= 4 and all(w > 300 and h > 150 for w, h in sizes), sizes  # every dashboard figure decoded
    assert box and box["width"] > 300 and box["height"] > 150
    assert not errors, errors
    # nothing the page needs came from the network; what it tried is optional (MathJax, for LaTeX in markdown)
    assert all("mathjax" in url for url in refused), refused
    assert (OUT / "offline_quickstart.png").stat().st_size > 10_000
