"""End to end in a real browser: JupyterLab (headless, 127.0.0.1, random port, token) runs a notebook that
shows the generation widget on SmolLM2; headless Chromium types a prompt, clicks Generate, sees the text
stream into the final pane, clicks a token chip and sees its plotly figures. Screenshot:
test-artifacts/widget.png.

Needs Debian's chromium (/usr/bin/chromium) and the Python `playwright` package driving it through
`executable_path` (never `playwright install`, which downloads a browser): `bash scripts/install_browser.sh`.
"""
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CELLS = [
    "import workbench as wb\n"
    "from workbench.fixtures.checkpoints import smollm2_path\n"
    "from workbench.ui.widget import widget\n"
    "s = wb.load(str(smollm2_path()), preset='cpu')",
    "w = widget(s, temperature=0.0, max_new_tokens=60)\n"
    "w",
]


def find_chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_notebook(path: pathlib.Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def wait_for_server(url: str, proc: subprocess.Popen, log: pathlib.Path, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"JupyterLab exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"JupyterLab did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


def accept_dialogs(page) -> None:
    """Accept any JupyterLab dialog (kernel choice, 'build recommended', ...) that is in the way."""
    for button in page.locator(".jp-Dialog .jp-mod-accept").all():
        if button.is_visible():
            button.click()


def test_widget_streams_in_jupyterlab(tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium at /usr/bin/chromium (install it with scripts/install_browser.sh)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the `playwright` Python package is missing (install it with scripts/install_browser.sh)")

    root = tmp_path / "lab"
    root.mkdir()
    write_notebook(root / "widget.ipynb")
    port, token = free_port(), secrets.token_hex(16)
    log = tmp_path / "jupyterlab.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # private runtime/settings/workspaces: no state from (or for) the user's own JupyterLab
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--allow-root", "--no-browser", "--ServerApp.open_browser=False",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    # no "get Jupyter news?" toast over the screenshot (and no news fetch)
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "widget.png"
    screenshot.unlink(missing_ok=True)
    with open(log, "w") as log_file:
        # its own process group, so the kernel it starts is ended with it
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=root,
                                start_new_session=True)
    page = None
    try:
        wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", proc, log)
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 1500})
            try:
                page = context.new_page()
                page.set_default_timeout(120_000)
                page.goto(f"http://127.0.0.1:{port}/lab/tree/widget.ipynb?token={token}")
                page.wait_for_selector(".jp-Notebook .jp-Cell .jp-InputArea-editor")
                page.wait_for_timeout(1500)  # let JupyterLab finish opening (and raise any dialog)
                accept_dialogs(page)

                page.locator(".jp-Notebook .jp-Cell").first.click()
                page.keyboard.press("Escape")  # command mode
                for _ in CELLS:
                    page.keyboard.press("Shift+Enter")
                    accept_dialogs(page)
                page.wait_for_selector(".wb-widget .wb-generate", timeout=240_000)  # model loaded, widget shown

                page.locator(".wb-prompt textarea").fill("Write a short poem about the sea.")
                page.locator(".wb-generate").click()
                # streamed: text in the final pane while the run is still going (Stop enabled)
                page.wait_for_function(
                    "() => { const f = document.querySelector('.wb-final');"
                    " const stop = document.querySelector('.wb-stop');"
                    " return f && f.innerText.trim().length > 0 && stop && !stop.disabled; }")
                partial = page.locator(".wb-final").inner_text()
                # finished: the status shows the finish reason, Generate is enabled again
                page.wait_for_function(
                    "() => { const s = document.querySelector('.wb-status');"
                    " const g = document.querySelector('.wb-generate');"
                    " return s && /tokens · .* tok\\/s · (stop|length)/.test(s.innerText) && g && !g.disabled; }",
                    timeout=240_000)
                final = page.locator(".wb-final").inner_text()
                assert final.strip() and partial.strip()[:10] in final, (partial, final)
                assert page.locator(".wb-generate").is_enabled()
                assert not page.locator(".wb-error").is_visible()

                # the token inspector: a click is handled in Python, and its plotly figure renders here
                page.locator(".wb-inspector .jupyter-button:visible").nth(2).click()
                page.wait_for_selector(".wb-inspector .wb-alternatives")
                page.wait_for_selector(".wb-inspector .js-plotly-plot", timeout=120_000)
                page.locator(".wb-widget").scroll_into_view_if_needed()
                page.wait_for_timeout(500)
                page.screenshot(path=str(screenshot))
            except BaseException:
                if page is not None:
                    page.screenshot(path=str(ARTIFACTS / "widget-failure.png"))
                raise
            finally:
                context.close()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernel it started
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert screenshot.exists()
