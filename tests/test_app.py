"""The browser demo: request checking, the iteration frames, and the page itself driven in Debian's
headless chromium (selenium + chromedriver): type a prompt, generate, get an image of the right size.

JEPAT_SAVE_SCREENSHOT=1 also writes the page's screenshot to docs/images/app_screenshot.png (the
README shows it); JEPAT_APP_CHECKPOINT=PATH serves that checkpoint or folder instead of the tiny one."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import app
from models.sampler import SamplingConfig
from util.pretrained import build_generator, load_pretrained

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-dev-shm-usage --disable-quic "
    "--disable-background-networking --disable-component-update --disable-sync --no-first-run "
    "--window-size=1280,1500"
).split()


@pytest.fixture
def tiny_checkpoint(shapes_run) -> Path:
    """The session's 2-step shapes run (tests/conftest.py): 16 px images as 4 tokens, 4 iterations."""
    return shapes_run / "checkpoint-last.pth"


def request(**changes):
    values = dict(
        text="a red circle",
        per_prompt=2,
        guidance=3.0,
        schedule="linear",
        temperature=1.0,
        num_iter=4,
        ode_steps=2,
        solver="euler",
        seed=0,
        seq_len=4,
    )
    values.update(changes)
    return app.parse_request(**values)


def test_requests_are_checked_and_explained():
    assert request().prompts == ["a red circle"] and request().sampling.num_iter == 4
    empty = request(text="  \n ")
    assert empty.prompts == [""] and "unconditional" in empty.notes[0]
    assert request(text="a red circle\n\na blue square").prompts == ["a red circle", "a blue square"]
    clamped = request(num_iter=50)
    assert clamped.sampling.num_iter == 4 and "4 tokens" in clamped.notes[0]
    with pytest.raises(
        app.RequestError,
        match=r"guidance scale must be between 1.0 and 20.0, got 100.*"
        r"temperature must be between",
    ):
        request(guidance=100, temperature=0)
    with pytest.raises(app.RequestError, match="seed is empty"):
        request(seed=None)
    with pytest.raises(app.RequestError, match="more than 64 images"):
        request(text="\n".join(f"prompt {i}" for i in range(5)), per_prompt=16)


def test_frames_show_the_canvas_filling_in(tiny_checkpoint, tmp_path):
    pre = load_pretrained(tiny_checkpoint)
    gen = build_generator(pre, torch.device("cpu"), "fp32")
    req = app.Request(["a red circle", ""], 2, SamplingConfig(num_iter=4, ode_steps=2, ode_solver="euler"), 3, [])
    grid, frames, gif = app.generate(gen, req, True, tmp_path)
    scale = math.ceil(app.DISPLAY_PX / 16)
    assert grid.size == ((2 * 17 + 1) * scale, (2 * 17 + 1) * scale)  # 2 x 2 images, 1 px padding
    assert [c for _, c in frames] == [f"{k}/4: {k}/4 tokens" for k in (1, 2, 3, 4)]
    assert frames[-1][0].tobytes() == grid.tobytes()  # nothing hidden after the last
    grey = (torch.tensor(list(frames[0][0].tobytes())).view(-1, 3) == 128).all(1).sum().item()
    assert grey > 0.5 * grid.width * grid.height  # 3 of 4 tokens still hidden
    assert Path(gif).is_file() and Path(gif).read_bytes()[:6] == b"GIF89a"
    # the frames only watch: the same seed gives the same images without them
    alone, _, _ = app.generate(gen, req, False, tmp_path)
    assert alone.tobytes() == grid.tobytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_page(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"app.py did not answer at {url} in {timeout} s:\n{log_path.read_text()[-3000:]}")


def browser(tmp_path: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)


def requested_urls(driver) -> list:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def fill(driver, css: str, text: str) -> None:
    field = driver.find_element("css selector", css)
    field.clear()
    field.send_keys(text)


def test_page_generates_in_headless_chromium(tiny_checkpoint, tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        reason = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; .ci/run installs them")
        pytest.skip(reason)
    from selenium.webdriver.support.ui import WebDriverWait

    checkpoint = os.environ.get("JEPAT_APP_CHECKPOINT", str(tiny_checkpoint))
    port, log_path = free_port(), tmp_path / "app.log"
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "app.py",
                "--checkpoint",
                checkpoint,
                "--port",
                str(port),
                *"--device cpu --precision fp32".split(),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    driver = None
    try:
        wait_for_page(url, proc, log_path)
        driver = browser(tmp_path)
        driver.get(url)
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_elements("css selector", "#prompts textarea"))
        message = lambda d: d.find_element("css selector", "#message").text  # noqa: E731
        fill(driver, "#guidance_scale input", "100")  # out of range: said on the page
        driver.find_element("css selector", "#generate").click()
        wait.until(lambda d: "Not generated" in message(d))
        assert "guidance scale must be between 1.0 and 20.0" in message(driver)
        fill(driver, "#guidance_scale input", "3")
        fill(driver, "#prompts textarea", "a red circle")
        driver.find_element("css selector", "#generate").click()
        size = wait.until(
            lambda d: d.execute_script(
                "const i = document.querySelector('#grid img');"
                "return i && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null;"
            )
        )
        pre = load_pretrained(checkpoint)
        px, per_prompt = pre.recipe["image"]["img_size"], 4
        scale = math.ceil(app.DISPLAY_PX / px)
        assert size == [(per_prompt * (px + 1) + 1) * scale, (px + 2) * scale]  # a row of 4, enlarged
        wait.until(lambda d: "4 image(s)" in message(d))
        wait.until(lambda d: d.find_elements("css selector", "#frames img"))
        time.sleep(1.0)  # let the gallery finish painting
        shot = tmp_path / "app_screenshot.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("JEPAT_SAVE_SCREENSHOT") == "1":
            (ROOT / "docs" / "images").mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, ROOT / "docs" / "images" / "app_screenshot.png")
        outside = [
            u
            for u in requested_urls(driver)
            if u.startswith(("http", "ws")) and not u.startswith((url, url.replace("http", "ws")))
        ]  # chrome:// pages are the browser's own
        assert not outside, f"the page asked for outside resources: {outside[:5]}"
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
