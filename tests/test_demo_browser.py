"""The demo in a real headless browser (issue 16 acceptance): start ``python -m lcm_kit.demo`` on localhost, draw a
stroke on the sketch canvas with Debian's chromium driven by Selenium, and check that an output image appears, that a
second stroke changes it, and that clearing the canvas shows a message in the page (not a traceback).

Needs the ``demo`` extra (gradio, selenium) and Debian's ``chromium`` + ``chromium-driver`` (``.ci/run`` installs
them); skipped with the reason otherwise. Set ``LCM_KIT_DEMO_SCREENSHOT=path.png`` to keep a screenshot of the page.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow
pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[demo]')")
pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[demo]')")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)  # fmt: skip

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# No network: no first-run, sync, component-update or background requests; a fresh profile each run.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "lcm_kit.demo", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            proc.kill()
            pytest.fail(f"the demo did not start:\n{proc.stdout.read()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='lcm_kit_chromium_')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def _draw(driver, canvas_block, path: list[tuple[int, int]]) -> None:
    """Drags the mouse along ``path`` (offsets from the canvas centre) with the brush selected."""
    canvas = canvas_block.find_elements(By.TAG_NAME, "canvas")[-1]
    actions = ActionChains(driver).move_to_element_with_offset(canvas, *path[0]).click_and_hold()
    for (x0, y0), (x1, y1) in zip(path, path[1:], strict=False):
        actions = actions.move_by_offset(x1 - x0, y1 - y0)
    actions.release().perform()


def _output(driver, previous: str | None, timeout: float = 60) -> tuple[str, np.ndarray]:
    """Waits for the sketch output image to appear (or to change from ``previous``); returns its URL and pixels."""

    def src(d):
        images = d.find_element(By.ID, "sketch-output").find_elements(By.TAG_NAME, "img")
        value = images[0].get_attribute("src") if images else None
        return value if value and value != previous else False

    url = WebDriverWait(driver, timeout).until(src)
    with urllib.request.urlopen(url, timeout=10) as response:
        return url, np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"), dtype=np.int16)


def _button(block, label: str):
    return next(b for b in block.find_elements(By.TAG_NAME, "button") if b.get_attribute("aria-label") == label)


def test_stroke_makes_and_changes_the_image(server, browser):
    browser.get(server)
    block = WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "sketch-canvas"))
    assert "Loaded" in browser.find_element(By.ID, "load-status").text
    _button(block, "Brush").click()
    _draw(browser, block, [(-70, -70), (-30, -40), (10, 0), (40, 50)])
    first_url, first = _output(browser, None)
    assert first.shape == (256, 256, 3) and first.std() > 0
    status = browser.find_element(By.ID, "sketch-status").text
    assert "ms per frame (4 UNet passes, 32x32 px)" in status
    _draw(browser, block, [(60, -80), (70, 0), (60, 80)])
    _, second = _output(browser, first_url)
    assert np.abs(second - first).max() > 0
    if os.environ.get("LCM_KIT_DEMO_SCREENSHOT"):
        browser.save_screenshot(os.environ["LCM_KIT_DEMO_SCREENSHOT"])
    _button(block, "Clear canvas").click()
    message = WebDriverWait(browser, 60).until(
        lambda d: "the canvas is empty" in d.find_element(By.ID, "sketch-status").text
    )
    assert message and "Traceback" not in browser.page_source
