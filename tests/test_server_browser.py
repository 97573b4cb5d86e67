"""The web page in a real headless browser: Playwright for Python driving Debian's chromium against
the server with the fake engine. Skipped, with the reason, only where chromium or Playwright is missing;
under CI=true that is a failure instead (CI must not go green while these tests skip).

Screenshots (phone and desktop) go to the test's temporary folder, and also to
$ZIMAGE_TEST_ARTIFACTS when that is set (a git-ignored folder such as test-artifacts/).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from zimage_native.server import FakeEngine, ServerSettings, create_app  # noqa: E402
from zimage_native.server.testing import LiveServer  # noqa: E402

# Under `pytest -n 2 --dist loadgroup` the module runs on one worker: one chromium and one server
# (module fixtures), not one of each per worker.
pytestmark = pytest.mark.xdist_group("browser")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 15_000


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def unavailable(reason: str):
    """Skip with ``reason``; under CI=true, fail with it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests must run)", pytrace=False)
    pytest.skip(reason)


def chromium_or_unavailable() -> str:
    executable = chromium_path()
    if executable is None:
        unavailable("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    return executable


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        unavailable("Playwright for Python is not installed (pip install playwright)")
    executable = chromium_or_unavailable()
    with sync_playwright() as p:
        try:
            instance = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        except Error as e:
            unavailable(f"chromium at {executable} did not start: {str(e).splitlines()[0]}")
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = FakeEngine(step_delay=0.05)
    app = create_app(engine, ServerSettings(data_dir=tmp_path_factory.mktemp("browser-data"), queue_size=1))
    with LiveServer(app) as live:
        live.engine = engine
        yield live


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#presets button').length > 0")
    yield page
    context.close()
    assert errors == [], errors


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> list[Path]:
    folders = [tmp_path_factory.mktemp("screenshots")]
    extra = os.environ.get("ZIMAGE_TEST_ARTIFACTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        folders.append(Path(extra))
    return folders


def screenshot(page, artifacts, name: str) -> Path:
    paths = [folder / name for folder in artifacts]
    page.screenshot(path=str(paths[0]), full_page=True)
    for other in paths[1:]:
        shutil.copy(paths[0], other)
    print(f"screenshot: {paths}")
    return paths[0]


def history_count(page) -> int:
    return page.locator("#history li.item").count()


def api_history(server) -> list[dict]:
    return httpx.get(server.url + "/api/history").json()["items"]


def test_generate_shows_progress_and_a_history_item_that_survives_reload(page, server, artifacts):
    page.get_by_role("button", name="1:1 small").click()
    assert page.input_value("#width") == "512" and page.input_value("#height") == "512"
    assert "active" in page.get_by_role("button", name="1:1 small").get_attribute("class")
    page.get_by_role("button", name="16:9").click()
    assert (page.input_value("#width"), page.input_value("#height")) == ("1280", "720")
    page.get_by_role("button", name="1:1 small").click()
    before = history_count(page)
    page.fill("#prompt", "a red fox in fresh snow")
    page.fill("#seed", "1234")
    page.click("#generate")
    job = page.locator("#jobs li.job").first
    job.locator(".state", has_text=re.compile(r"Step \d+ of 8")).wait_for()
    width = page.eval_on_selector("#jobs li.job .bar-inner", "el => parseFloat(el.style.width)")
    assert 0 < width <= 100
    page.wait_for_function(f"document.querySelectorAll('#history li.item').length === {before + 1}")
    assert job.get_attribute("data-status") == "completed"
    item = page.locator("#history li.item").first
    assert "a red fox in fresh snow" in item.inner_text() and "512x512 seed 1234" in item.inner_text()
    page.wait_for_function("(() => { const i = document.querySelector('#history li.item img');"
                           " return i && i.complete && i.naturalWidth > 0; })()")
    page.wait_for_function("document.querySelectorAll('#result img').length === 1")
    screenshot(page, artifacts, "web-phone.png")
    assert api_history(server)[0]["seed"] == 1234

    page.reload()
    page.wait_for_function(f"document.querySelectorAll('#history li.item').length === {before + 1}")
    assert "a red fox in fresh snow" in page.locator("#history li.item").first.inner_text()


def test_reuse_fills_the_form(page, server):
    if not api_history(server):
        pytest.skip("needs an image in the history")
    page.wait_for_function("document.querySelectorAll('#history li.item').length > 0")
    item = api_history(server)[0]
    page.locator("#history li.item").first.get_by_role("button", name="Re-use").click()
    assert page.input_value("#prompt") == item["prompt"]
    assert page.input_value("#seed") == str(item["seed"])
    assert page.input_value("#width") == str(item["width"])
    variance = item["params"].get("seed_variance")
    assert (float(page.input_value("#seed_variance")) == variance) if variance else page.input_value("#seed_variance") == ""
    cache = item["params"].get("first_block_cache")
    assert (float(page.input_value("#first_block_cache")) == cache) if cache else page.input_value("#first_block_cache") == ""


def test_template_and_prompt_fields_reach_the_job(page, server, artifacts):
    page.click("#format summary")
    options = page.locator("#template option")
    page.wait_for_function("document.querySelectorAll('#template option').length > 50")  # fetched after load
    assert options.count() > 50
    name = options.nth(1).get_attribute("value")
    page.select_option("#template", name)
    page.fill("#system_prompt", "You are a careful painter.")
    page.fill("#prompt", "a bowl of plums")
    page.get_by_role("button", name="1:1 small").click()
    page.fill("#steps", "2")
    page.fill("#seed_variance", "20")
    page.fill("#first_block_cache", "0.1")
    page.fill("#guidance", "1")  # ComfyUI's "cfg 1" habit: the page says what it costs here
    screenshot(page, artifacts, "web-phone-prompt-format.png")
    before = len(api_history(server))
    page.click("#generate")
    page.wait_for_selector("#message.info:not([hidden])")
    assert "cfg 1 means off" in page.inner_text("#message")
    page.wait_for_function(f"document.querySelectorAll('#history li.item').length >= {before + 1}")
    record = api_history(server)[0]["params"]
    assert record["template"] == name and record["system_prompt"] == "You are a careful painter."
    assert record["steps"] == 2
    assert record["seed_variance"] == 20 and record["seed_variance_share"] == 0.5  # the API's default share
    assert record["first_block_cache"] == 0.1


def test_a_prompt_cut_to_max_sequence_length_is_shown(page, server):
    """Known once the job runs (the worker counts the tokens): the started event's advice."""
    page.get_by_role("button", name="1:1 small").click()
    page.fill("#steps", "2")
    page.fill("#guidance", "")
    page.fill("#prompt", "a red fox in fresh snow, " * 30)  # 800 tokens in the chat format (one per byte here)
    page.click("#generate")
    page.wait_for_selector("#message.info:not([hidden])")
    page.wait_for_function("document.querySelector('#message').textContent.includes('max_sequence_length')")
    assert "more than max_sequence_length 512" in page.inner_text("#message")
    assert "raise max_sequence_length (the web page's Token limit) to 800" in page.inner_text("#message")
    # the page's field takes it: the same prompt is then not cut
    page.click("#format summary")
    assert page.get_attribute("#max_sequence_length", "placeholder") == "512"
    page.fill("#max_sequence_length", "800")
    page.click("#generate")
    job = page.locator("#jobs li.job").first
    job.locator(".state", has_text=re.compile(r"Step|Done")).wait_for()
    job_id = job.get_attribute("data-id")
    state = httpx.get(f"{server.url}/api/v1/jobs/{job_id}").json()
    assert state["params"]["max_sequence_length"] == 800 and state["advice"] == []


def test_upload_image_mask_and_control_image(page, server, artifacts, tmp_path):
    from PIL import Image

    from zimage_native.server.engine import seed_colour

    files = {}
    for name, mode, colour, size in (("image", "RGB", (200, 10, 10), (384, 256)), ("mask", "L", 0, (384, 256)),
                                     ("control_image", "RGB", (0, 0, 0), (384, 256))):
        picture = Image.new(mode, size, colour)
        if name == "mask":
            picture.paste(255, (0, 0, 192, 256))  # repaint the left half
        files[name] = tmp_path / f"{name}.png"
        picture.save(files[name])
    page.click("#inputs summary")
    page.set_input_files("#image-file", str(files["image"]))
    page.locator("#image-preview").wait_for(state="visible")
    assert page.inner_text("#task") == "(img2img)"
    page.set_input_files("#mask-file", str(files["mask"]))
    page.locator("#mask-preview").wait_for(state="visible")
    assert page.inner_text("#task") == "(inpainting)"
    page.set_input_files("#control_image-file", str(files["control_image"]))
    page.locator("#control_image-preview").wait_for(state="visible")
    assert page.inner_text("#task") == "(ControlNet inpainting)"
    for field in ("image", "mask", "control_image"):  # the previews show the uploaded pictures
        page.wait_for_function(f"(() => {{ const i = document.querySelector('#{field}-preview');"
                               f" return i.complete && i.naturalWidth === 384; }})()")
    screenshot(page, artifacts, "web-phone-inputs.png")
    page.click("#control_image-clear")
    assert page.locator("#control_image-preview").is_hidden() and page.inner_text("#task") == "(inpainting)"

    page.fill("#prompt", "repaint the left half")
    page.fill("#seed", "77")
    page.fill("#steps", "2")
    page.fill("#width", "")
    page.fill("#height", "")
    before = len(api_history(server))
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('#history li.item').length >= {before + 1}")
    latest = api_history(server)[0]
    assert latest["params"]["task"] == "inpaint" and (latest["width"], latest["height"]) == (384, 256)
    out = Image.open(io.BytesIO(httpx.get(server.url + latest["url"]).content)).convert("RGB")
    assert out.getpixel((10, 100)) == seed_colour(77) and out.getpixel((370, 100)) == (200, 10, 10)

    page.click("#image-clear")
    page.click("#mask-clear")
    page.set_input_files("#control_image-file", str(files["control_image"]))
    page.locator("#control_image-preview").wait_for(state="visible")
    page.fill("#control_scale", "0.5")
    page.fill("#prompt", "follow the pose")
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('#history li.item').length >= {before + 2}")
    latest = api_history(server)[0]["params"]  # the image's record
    assert latest["task"] == "control" and latest["control_scale"] == 0.5


def test_cancel(page, artifacts):
    page.fill("#prompt", "a very slow picture")
    page.get_by_role("button", name="1:1 small").click()
    page.fill("#steps", "60")
    page.click("#generate")
    job = page.locator("#jobs li.job").first
    job.locator(".state", has_text=re.compile(r"Step \d+ of 60")).wait_for()
    job.get_by_role("button", name="Cancel").click()
    job.locator(".state", has_text="Cancelled").wait_for()
    assert job.get_attribute("data-status") == "cancelled"
    screenshot(page, artifacts, "web-phone-cancelled.png")


def test_a_reload_keeps_tracking_a_running_job_and_can_cancel_it(page, artifacts):
    """After a reload (or in a second tab) a running job is listed again with its progress and a
    Cancel button that works; before, it vanished from the page until its image appeared."""
    page.fill("#prompt", "a job that outlives its page")
    page.get_by_role("button", name="1:1 small").click()
    page.fill("#steps", "80")
    page.click("#generate")
    page.locator("#jobs li.job .state", has_text=re.compile(r"Step \d+ of 80")).first.wait_for()
    page.reload()
    page.wait_for_function("document.querySelectorAll('#presets button').length > 0")
    job = page.locator("#jobs li.job").first
    assert "a job that outlives its page" in job.inner_text()
    job.locator(".state", has_text=re.compile(r"Step \d+ of 80")).wait_for()
    job.get_by_role("button", name="Cancel").click()
    job.locator(".state", has_text="Cancelled").wait_for()


def test_queue_full_message(page, server, artifacts):
    ids = []
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for _ in range(2):  # queue size 1: one running, one waiting
            r = c.post("/api/v1/jobs", json={"prompt": "filler", "width": 256, "height": 256, "steps": 60})
            assert r.status_code == 202
            ids.append(r.json()["id"])
        try:
            page.fill("#prompt", "one too many")
            page.click("#generate")
            message = page.locator("#message")
            message.wait_for(state="visible")
            assert re.search(r"The queue is full\. Try again in \d+ s\.", message.inner_text())
            assert page.locator("#jobs li.job", has_text="one too many").count() == 0
            screenshot(page, artifacts, "web-phone-queue-full.png")
        finally:
            for job_id in ids:
                c.post(f"/api/v1/jobs/{job_id}/cancel")


def test_delete_and_clear(page, server):
    with httpx.Client(base_url=server.url, timeout=30) as c:  # make sure there are two images
        r = c.post("/v1/images/generations", json={"prompt": "extra", "n": 2, "size": "256x256",
                                                   "num_inference_steps": 1})
        assert r.status_code == 200, r.text
    page.reload()
    page.wait_for_function("document.querySelectorAll('#history li.item').length >= 2")
    total = len(api_history(server))
    first = page.locator("#history li.item").first
    gone = first.get_attribute("data-id")
    first.get_by_role("button", name="Delete").click()
    page.wait_for_function(f"!document.querySelector('#history li.item[data-id=\"{gone}\"]')")
    assert len(api_history(server)) == total - 1 and gone not in [i["id"] for i in api_history(server)]
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#clear")
    page.locator("#history-empty").wait_for(state="visible")
    assert history_count(page) == 0 and api_history(server) == []
    page.reload()
    page.locator("#history-empty").wait_for(state="visible")


def test_desktop_layout_screenshot(browser, server, artifacts):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        c.post("/v1/images/generations", json={"prompt": "a lighthouse at dusk", "n": 3, "size": "512x512",
                                               "num_inference_steps": 1})
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#history li.item').length >= 3")
    page.fill("#prompt", "a lighthouse at dusk")
    boxes = [page.locator(sel).bounding_box() for sel in ("#compose", "#history-panel")]
    assert boxes[0]["x"] < boxes[1]["x"]  # two columns side by side on a wide screen
    screenshot(page, artifacts, "web-desktop.png")
    context.close()


def test_token_login(browser, tmp_path):
    token = "Ab3/x+Yz9w== a,b"  # characters a cookie would quote: the page must still sign in
    app = create_app(FakeEngine(), ServerSettings(data_dir=tmp_path, token=token))
    with LiveServer(app) as live:
        context = browser.new_context(viewport=PHONE)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(live.url + "/")
        page.locator("#login").wait_for(state="visible")
        page.fill("#token", "wrong")
        page.click("#login-form button[type=submit]")
        page.locator("#login-error").wait_for(state="visible")
        page.fill("#token", token)
        page.click("#login-form button[type=submit]")
        page.wait_for_function("document.querySelectorAll('#presets button').length > 0")
        assert not page.locator("#login").is_visible()
        # The cookie carries the token for the event stream and the images too.
        page.fill("#prompt", "behind a token")
        page.get_by_role("button", name="1:1 small").click()
        page.fill("#steps", "2")
        page.click("#generate")
        page.wait_for_function("(() => { const i = document.querySelector('#history li.item img');"
                               " return i && i.complete && i.naturalWidth > 0; })()")
        context.close()


def test_the_queue_line_counts_a_job_whose_images_are_being_stored(browser, tmp_path):
    """A job whose images the writer thread stores is still running for its client, but the
    queue object counts it under `saving`: the page's line said "0 running" for it."""
    import time

    from tests.test_server_saving import WAIT, GatedSaves

    with LiveServer(create_app(FakeEngine(), ServerSettings(data_dir=tmp_path, queue_size=2))) as live:
        gate = GatedSaves(live.app.state.storage)
        context = browser.new_context(viewport=PHONE)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(live.url + "/")
            page.wait_for_function("document.querySelectorAll('#presets button').length > 0")
            # Control: nothing saving, the line is as before.
            page.wait_for_function("document.getElementById('queue').textContent.startsWith('queue: ')")
            assert page.locator("#queue").inner_text() == "queue: 0 running, 0 waiting (of 2)"
            with httpx.Client(base_url=live.url, timeout=30) as c:
                r = c.post("/api/v1/jobs", json={"prompt": "slow disk", "width": 256, "height": 256, "steps": 1})
                assert r.status_code == 202
            assert gate.entered.wait(WAIT)
            assert live.app.state.manager.stats()["saving"] == 1
            page.evaluate("refreshQueue()")
            deadline = time.monotonic() + WAIT
            while "saving" not in page.locator("#queue").inner_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert page.locator("#queue").inner_text() == "queue: 0 running, 1 saving, 0 waiting (of 2)"
        finally:
            gate.release.set()
            context.close()
