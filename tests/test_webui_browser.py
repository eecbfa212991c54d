"""The web UI in a real browser: Debian's chromium (headless, via Playwright) drives the page,
which talks to a real tritonserver serving the demo repository over gRPC.

Needs the `[ui]` extra (gradio, playwright) and a chromium binary: `apt-get install chromium`
(no `playwright install`: nothing is downloaded). Outside CI a missing piece skips these tests
with the reason; with `CI` set it fails them. Screenshots go to build/test-artifacts/webui/.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdserve_pipeline.triton_server import TritonServer, pick_free_ports

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "build" / "test-artifacts" / "webui"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
VIEWPORT = {"width": 1400, "height": 1100}
STEPS = "3"


def _missing(reason: str) -> None:
    """Skip outside CI; in CI a missing browser or UI dependency is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)")
    pytest.skip(reason)


def _chromium() -> str:
    path = os.environ.get("SDSERVE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        _missing("Debian's chromium is not installed (apt-get install -y chromium)")
    return path


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sync_playwright():
    for module in ("gradio", "playwright"):
        if importlib.util.find_spec(module) is None:
            _missing(
                f"{module} is not installed (pip install --no-deps -r client/requirements-ui.txt)"
            )
    from playwright.sync_api import sync_playwright

    return sync_playwright


@pytest.fixture(scope="module")
def chromium() -> str:
    return _chromium()


@pytest.fixture(scope="module")
def stack(sync_playwright, chromium, repository, tmp_path_factory):
    """A tritonserver on the demo repository and the web UI in front of it (both on loopback).

    The UI starts while the server loads its models: it is a client and waits for nothing.
    """
    build = tmp_path_factory.mktemp("triton-webui")
    (ui_port,) = pick_free_ports("127.0.0.1", 1)
    with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, build_dir=build) as srv:
        log = (build / "webui.log").open("wb")
        command = [sys.executable, "-m", "sdserve_client.webui", "--server", srv.grpc_url,
                   "--metrics-url", srv.metrics_url, "--host", "127.0.0.1",
                   "--port", str(ui_port), "--concurrency", "1"]  # fmt: skip
        env = {**os.environ, "GRADIO_TEMP_DIR": str(build / "gradio")}
        ui = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            srv.wait_ready(timeout_s=300)
            url = f"http://127.0.0.1:{ui_port}/"
            _wait_http(url, ui, build / "webui.log", timeout_s=180)
            yield {"url": url, "server": srv, "chromium": chromium, "log": build / "webui.log"}
        finally:
            ui.terminate()
            try:
                ui.wait(timeout=20)
            except subprocess.TimeoutExpired:
                ui.kill()
                ui.wait()
            log.close()


@pytest.fixture(scope="module")
def browser(sync_playwright, stack):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=stack["chromium"], args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, stack, request):
    """A fresh page on the UI, ready; a screenshot of how it ended is kept per test."""
    context = browser.new_context(viewport=VIEWPORT)
    # Offline page: anything but the UI itself (fonts, CDNs, telemetry) is refused at once.
    context.route(re.compile(r"^(?!http://127\.0\.0\.1:)"), lambda route: route.abort())
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(stack["url"], wait_until="load")
    page.locator("#server-status", has_text="Ready").wait_for(timeout=60_000)
    yield page
    _shot(page, f"end-{request.node.name}")
    context.close()


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """A 64×64 RGB gradient (distinct pixels, so changes are visible)."""
    y, x = np.mgrid[0:64, 0:64]
    array = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("webui-inputs") / "gradient64.png"
    Image.fromarray(array).save(path)
    return path


# --- helpers --------------------------------------------------------------------------------


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the web UI exited ({process.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the web UI did not answer at {url} in {timeout_s} s:\n{log.read_text()}")


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _set_number(page, elem_id: str, value: str) -> None:
    """Types into a slider's number box and commits it."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")


def _common(page, prompt: str = "a red bicycle", steps: str = STEPS) -> None:
    page.locator("#prompt textarea").fill(prompt)
    _set_number(page, "steps", steps)


def _generate(page, button: str, timeout_ms: int = 180_000) -> str:
    """Clicks a generate button and waits for the run: the busy bar comes and goes.

    Returns the summary line, or "ERROR: " and the error toasts' text.
    """
    page.locator(f"#{button}").click()
    bar = page.locator("#busy .sd-bar")
    bar.wait_for(state="attached", timeout=10_000)
    bar.wait_for(state="detached", timeout=timeout_ms)
    toasts = page.locator(".toast-body").all_inner_texts()
    if toasts:
        return "ERROR: " + " | ".join(toasts)
    return page.locator("#seeds").inner_text()


def _result_images(page) -> list[dict]:
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')].every(i => i.complete)"
    )
    return page.eval_on_selector_all(
        "#results img",
        "els => els.map(e => ({w: e.naturalWidth, h: e.naturalHeight, src: e.src}))",
    )


def _download(page, src: str) -> np.ndarray:
    response = page.request.get(src)
    assert response.ok, (src, response.status)
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def _dismiss_toasts(page) -> None:
    for close in page.locator(".toast-close").all():
        close.click()


def _paint_stroke(page) -> None:
    """Drags the brush across the middle of the uploaded image (the editor fits it centred)."""
    page.locator("#inpaint-editor button[aria-label='Brush']").click()
    page.keyboard.press("Escape")  # close the brush options, if they opened
    canvas = page.locator("#inpaint-editor canvas").first.bounding_box()
    cx, cy = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
    page.mouse.move(cx - 25, cy)
    page.mouse.down()
    page.mouse.move(cx + 25, cy, steps=12)
    page.mouse.up()


def _dropdown_options(page, elem_id: str) -> list[str]:
    page.locator(f"#{elem_id} input").click()
    options = page.locator(f"#{elem_id} [role=option]")
    options.first.wait_for()
    texts = options.all_inner_texts()
    page.locator("#server-status").click()  # closes the list
    return [text.replace("✓", "").strip() for text in texts]


def _summary_seeds(text: str) -> list[int]:
    return [int(seed) for seed in re.findall(r"`?(\d{1,20})`?", text.split("seed", 1)[1])]


# --- tests ----------------------------------------------------------------------------------


def test_page_lists_the_servers_models_and_schedulers(page):
    status = page.locator("#server-status").inner_text()
    assert "inpaint" in status and "Ready" in status
    schedulers = _dropdown_options(page, "scheduler")
    for name in ("model default", "pndm", "euler_a", "dpmpp_2m_karras", "unipc"):
        assert name in schedulers, schedulers
    assert _dropdown_options(page, "model") == ["inpaint"]  # the pipeline, not its parts
    assert page.locator("#steps input[type=range]").get_attribute("max") == "150"


def test_inpaint_painted_mask_gives_right_size_and_seed_then_reuse_and_iterate(page, picture):
    page.set_input_files("#inpaint-editor input[type=file]", str(picture))
    page.locator("#inpaint-editor canvas").first.wait_for()
    page.wait_for_timeout(1000)  # the editor fits the picture to its canvas
    _paint_stroke(page)
    _common(page)
    summary = _generate(page, "inpaint-generate")
    assert summary.startswith("inpaint: 1 image of 64×64"), summary
    (seed,) = _summary_seeds(summary)
    (shown,) = _result_images(page)
    assert (shown["w"], shown["h"]) == (64, 64)
    assert f"seed {seed} · 64×64" in page.locator("#results").inner_text()
    _shot(page, "inpaint")

    output = _download(page, shown["src"])
    source = np.asarray(Image.open(picture).convert("RGB"))
    changed = (output != source).any(axis=-1)  # (64, 64)
    assert changed[28:36, 28:36].all(), "the painted centre was not regenerated"
    assert not changed[:6, :6].any() and not changed[-6:, -6:].any(), "corners must be kept"

    page.locator("#seed-reuse").click()
    page.wait_for_function(
        f"() => document.querySelector('#seed input, #seed textarea').value === '{seed}'"
    )
    again = _generate(page, "inpaint-generate")
    assert _summary_seeds(again) == [seed], again
    np.testing.assert_array_equal(_download(page, _result_images(page)[0]["src"]), output)

    page.locator("#use-as-input").click()
    page.get_by_role("tab", name="Outpaint").click()
    page.locator("#outpaint-image img").wait_for()
    size = page.eval_on_selector("#outpaint-image img", "e => [e.naturalWidth, e.naturalHeight]")
    assert size == [64, 64]


def test_outpaint_preview_and_run_give_the_enlarged_size(page, picture):
    page.get_by_role("tab", name="Outpaint").click()
    page.set_input_files("#outpaint-image input[type=file]", str(picture))
    _set_number(page, "outpaint-right", "0")
    _set_number(page, "outpaint-left", "16")
    _set_number(page, "outpaint-bottom", "8")
    page.locator("#outpaint-caption", has_text="→ 80×72").wait_for()
    page.wait_for_function(
        """() => { const i = document.querySelector('#outpaint-preview img');
                   return i && i.complete && i.naturalWidth === 80 && i.naturalHeight === 72; }"""
    )
    _common(page)
    _shot(page, "outpaint-preview")
    summary = _generate(page, "outpaint-generate")
    _shot(page, "outpaint")
    assert summary.startswith("outpaint: 1 image of 80×72"), summary
    (shown,) = _result_images(page)
    assert (shown["w"], shown["h"]) == (80, 72)


def test_image_to_image_redraws_the_uploaded_picture_at_its_size(page, picture):
    page.get_by_role("tab", name="Image to image").click()
    page.set_input_files("#img2img-image input[type=file]", str(picture))
    _set_number(page, "img2img-strength", "0.5")
    _common(page)
    summary = _generate(page, "img2img-generate")
    _shot(page, "img2img")
    assert summary.startswith("img2img: 1 image of"), summary
    (shown,) = _result_images(page)
    with Image.open(picture) as original:
        assert (shown["w"], shown["h"]) == original.size


def test_text_to_image_shows_progress_then_two_seeded_images(page):
    page.get_by_role("tab", name="Text to image").click()
    _set_number(page, "t2i-height", "64")
    _set_number(page, "t2i-width", "96")
    _set_number(page, "num-images", "2")
    page.locator("#seed input, #seed textarea").fill("1234")
    _common(page, "a lighthouse at dusk", steps="40")  # long enough to watch, under load too
    # Every text the bar and the gallery show is recorded in the page as it changes (polling
    # from here would miss fast steps on a loaded machine).
    page.evaluate(
        """() => {
        window.__seen = {bar: [], results: []};
        for (const [id, key] of [['busy', 'bar'], ['results', 'results']]) {
            const node = document.getElementById(id);
            new MutationObserver(() => window.__seen[key].push(node.innerText))
                .observe(node, {subtree: true, childList: true, characterData: true});
        }
    }"""
    )
    page.locator("#t2i-generate").click()
    page.locator("#busy .sd-bar").wait_for(timeout=10_000)  # the bar while running
    page.locator("#busy", has_text="Step").wait_for(timeout=120_000)
    _shot(page, "text-to-image-running")
    page.locator("#busy .sd-bar").wait_for(state="detached", timeout=180_000)
    seen = page.evaluate("() => window.__seen")
    seen_steps = {step for text in seen["bar"] for step in re.findall(r"Step (\d+)/", text)}
    assert len(seen_steps) >= 2, seen_steps  # the bar moved step by step
    assert any("preview · step" in text for text in seen["results"])  # a live preview
    page.locator("#busy .sd-bar").wait_for(state="detached", timeout=180_000)
    summary = page.locator("#seeds").inner_text()
    assert summary.startswith("text-to-image: 2 images of 96×64"), summary
    assert _summary_seeds(summary) == [1234, 1235]
    assert page.locator("#busy .sd-bar").count() == 0
    images = _result_images(page)
    assert [(i["w"], i["h"]) for i in images] == [(96, 64), (96, 64)]
    results = page.locator("#results").inner_text()
    assert "seed 1234 · 96×64" in results and "seed 1235 · 96×64" in results
    assert "preview" not in results  # the images replaced the previews
    _shot(page, "text-to-image")


def _cancelled_count(stack) -> float:
    from sdserve_client.webui.server_info import fetch_metrics, metric_value
    from sdserve_protocol.metrics import REQUESTS_METRIC

    text = fetch_metrics(stack["server"].metrics_url) or ""
    return metric_value(text, REQUESTS_METRIC, "inpaint", outcome="cancelled") or 0


def test_cancel_stops_a_running_generation_on_the_server(page, stack):
    before = _cancelled_count(stack)
    page.get_by_role("tab", name="Text to image").click()
    _set_number(page, "t2i-height", "256")  # 150 steps at 256x256: seconds, even unloaded
    _set_number(page, "t2i-width", "256")
    _common(page, "a long walk", steps="150")
    page.locator("#t2i-generate").click()
    page.locator("#busy", has_text="Step").wait_for(timeout=60_000)
    page.locator("#cancel").click()
    page.locator("#busy .sd-bar").wait_for(state="detached", timeout=60_000)
    page.locator("#seeds", has_text="Cancelled.").wait_for(timeout=30_000)
    assert page.locator("#seeds").inner_text() == "Cancelled."
    _shot(page, "cancelled")
    deadline = time.monotonic() + 60
    while _cancelled_count(stack) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _cancelled_count(stack) == before + 1  # the server dropped it, not just the page
    _dismiss_toasts(page)
    # the page (and the server) go on: the next run gives its image
    _set_number(page, "t2i-height", "64")
    _set_number(page, "t2i-width", "64")
    _common(page, steps="2")
    assert _generate(page, "t2i-generate").startswith("text-to-image: 1 image of 64×64")


def test_bad_setting_shows_the_refusal_with_the_served_list(page):
    page.get_by_role("tab", name="Text to image").click()
    _set_number(page, "t2i-height", "64")
    _set_number(page, "t2i-width", "64")
    _common(page, steps="2")
    scheduler = page.locator("#scheduler input")
    scheduler.fill("warp_drive")  # the dropdown takes custom names: the served list decides
    scheduler.press("Enter")
    text = _generate(page, "t2i-generate")
    assert "Invalid setting: scheduler: 'warp_drive' is unknown to this model" in text, text
    assert "dpmpp_2m_karras" in text  # the server's list of valid names
    _shot(page, "server-error")
    _dismiss_toasts(page)
    scheduler.fill("euler_a")
    scheduler.press("Enter")
    assert _generate(page, "t2i-generate").startswith("text-to-image: 1 image of 64×64")
