"""The demo site (scripts/demo --web) driven in a real, headless Chromium.

Debian's ``chromium`` driven by Playwright for Python (``executable_path``:
no browser is ever downloaded).  Without them the test skips, saying so,
except where ``HPC_REQUIRE_BROWSER=1`` (CI sets it): there it fails.
Screenshots of every page go to ``test-artifacts/e2e/`` (gitignored).
"""

import hashlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from harness import REPO, agent_pid, free_port, wait_for

CHROMIUM = os.environ.get("HPC_CHROMIUM", "/usr/bin/chromium")
#: Chromium's flags for this machine: headless, and none of its own
#: background connections (a closed network refuses them, which stalls it).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = os.path.join(REPO, "test-artifacts", "e2e")


def _browser_missing():
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright)"
    return None


@pytest.fixture(scope="module")
def browser_or_skip():
    missing = _browser_missing()
    if missing:
        if os.environ.get("HPC_REQUIRE_BROWSER") == "1":
            pytest.fail(f"HPC_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(f"the browser test needs a browser: {missing}")


@pytest.fixture
def demo(browser_or_skip, tmp_path):
    """``run_demo.py --web`` on a free port, until the test ends (then Ctrl-C)."""
    base = tmp_path / "demo"
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HPC_TEST", "HPC_IPC", "HPC_WEBSOCKET", "DJANGO_"))}
    env.update({"HPC_DEMO_DIR": str(base), "PYTHONUNBUFFERED": "1"})
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "demo", "run_demo.py"), "--web", "--port",
         str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    deadline = time.monotonic() + 60
    url = None
    while url is None:
        line = process.stdout.readline()
        if not line or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the demo site did not start:\n" + "".join(output))
        output.append(line)
        found = re.search(r"The demo site is at (http://\S+)", line)
        url = found and found[1]
    assert "demo / demo" in "".join(output)
    yield url, base
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, "".join(output) + out
    assert agent_pid(str(base / "agent")) is None  # everything it started is gone


@pytest.fixture
def page(demo):
    from playwright.sync_api import sync_playwright

    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(demo[1].parent / "chromium-profile"), executable_path=CHROMIUM,
            args=CHROMIUM_ARGS, headless=True, accept_downloads=True,
            viewport={"width": 1280, "height": 900})
        context.set_default_timeout(20000)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def shot(page, name):
    page.screenshot(path=os.path.join(ARTIFACTS, f"{name}.png"), full_page=True)


def submit(page, url, name, script):
    page.goto(url + "jobs/new/")
    page.fill("#id_name", name)
    page.fill("#id_script", script)
    page.fill("#id_walltime_minutes", "10")
    shot(page, f"submit-{name}")
    page.click("main button[type=submit]")
    page.wait_for_url(re.compile(r"/jobs/\d+/$"))
    return int(re.search(r"/jobs/(\d+)/$", page.url)[1])


def test_a_user_runs_a_job_and_works_with_its_files_in_the_browser(demo, page):
    url, base = demo
    page.goto(url)
    page.wait_for_url(re.compile(r"/login/"))
    shot(page, "login")
    page.fill("#id_username", "demo")
    page.fill("#id_password", "demo")
    page.click("main button[type=submit]")
    page.wait_for_url(url)
    shot(page, "jobs")

    # Submit; the state reaches COMPLETED on the page without a reload.
    job = submit(page, url, "e2e", "head -c 300000 /dev/urandom > data.bin\n"
                                   "mkdir -p logs && seq 1 5000 > logs/count.txt\nsleep 1\n")
    page.evaluate("window.notReloaded = true")
    page.wait_for_function(
        "document.getElementById('job-state').textContent.trim() === 'Completed'",
        timeout=30000)
    assert page.evaluate("window.notReloaded") is True
    page.wait_for_selector('#history td:has-text("Completed")')
    page.wait_for_selector('.hpc-rows tr[data-path="data.bin"]')
    shot(page, "job")

    # Download a file through the browser and compare the bytes.
    on_disk = (base / "agent" / "jobs" / str(job) / "data.bin").read_bytes()
    with page.expect_download() as download:
        page.click('.hpc-rows tr[data-path="data.bin"] a')
    with open(download.value.path(), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(on_disk).digest()
    assert download.value.suggested_filename == "data.bin"

    # Resume it: a Range request from where a cut-off download stopped,
    # valid only for the same file (If-Range).
    file_url = url + f"hpc/{job}/files/data.bin"
    head = page.request.head(file_url)
    assert head.headers["accept-ranges"] == "bytes"
    resumed = page.request.get(file_url, headers={"Range": "bytes=123456-",
                                                  "If-Range": head.headers["etag"]})
    assert resumed.status == 206
    assert resumed.headers["content-range"] == f"bytes 123456-299999/{len(on_disk)}"
    assert resumed.body() == on_disk[123456:]

    # A folder, and a text file's tail in the page.
    page.click('.hpc-rows a[data-dir="logs"]')
    page.click('.hpc-rows tr[data-path="logs/count.txt"] [data-tail]')
    page.wait_for_function(
        "document.querySelector('.hpc-tail-text').textContent.trim().endsWith('4999\\n5000')")
    assert "bytes" in page.inner_text(".hpc-tail-note")  # a range, not the whole file
    shot(page, "job-tail")

    # Upload an input file into that folder.
    page.set_input_files(".hpc-upload input[type=file]", files=[
        {"name": "input.csv", "mimeType": "text/csv", "buffer": b"a,b\n1,2\n"}])
    page.click(".hpc-upload button[type=submit]")
    page.wait_for_selector(".messages li.success")
    assert "Uploaded logs/input.csv" in page.inner_text(".messages")
    assert (base / "agent" / "jobs" / str(job) / "logs" / "input.csv").read_bytes() == \
        b"a,b\n1,2\n"
    page.click('.hpc-rows a[data-dir="logs"]')
    page.wait_for_selector('.hpc-rows tr[data-path="logs/input.csv"]')
    shot(page, "job-upload")
    page.set_viewport_size({"width": 390, "height": 844})
    shot(page, "job-phone")
    page.set_viewport_size({"width": 1280, "height": 900})

    # Cancel a sleeping job from the list, and watch it stop.
    sleeper = submit(page, url, "sleeper", "sleep 300\n")
    page.goto(url)
    row = page.locator(f'tr[data-job-id="{sleeper}"]')
    row.locator('.state:has-text("Running")').wait_for(timeout=20000)
    row.locator(".if-cancel button").click()
    page.wait_for_url(url)
    page.locator(f'tr[data-job-id="{sleeper}"] .state:has-text("Cancelled")').wait_for(
        timeout=20000)
    wait_for(lambda: not row.locator(".if-cancel").is_visible(), what="Cancel to go")
    shot(page, "jobs-cancelled")

    page.goto(url + "clusters/")
    assert "online" in page.inner_text("table")
    shot(page, "clusters")
