"""The object-removal web page (glcic_fast/serving/static) over real HTTP on loopback: its
files are served with their content types and name no outside address; in a real headless
Chromium (selenium), a photo opened with the file picker, painted over with the mouse and
removed comes back at the photo's full size: the input outside the mask the page sent (drawn
where the stroke went, at full resolution although the photo is shown scaled), what
glcic_fast.complete gives inside it, downloadable; refusals (413 too large, 503 busy) are shown
on the page in the service's own words; the page says it is busy while a request runs.

GLCIC_FAST_WRITE_SCREENSHOT=1 also writes the page after a removal to docs/web_page.png."""

import base64
import concurrent.futures
import os
import re
import shutil

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serving tests need the serve extra: pip install 'glcic_fast[serve]'")
pytest.importorskip("uvicorn", reason="the serving tests need the serve extra: pip install 'glcic_fast[serve]'")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx (the serve extra)")

import glcic_fast
from glcic_fast.imageio import read_image, write_image
from glcic_fast.inference.bench import DEMO_WEIGHTS
from glcic_fast.serving.app import create_app
from glcic_fast.serving.config import ServiceConfig
from glcic_fast.serving.server import serving as running

from helpers import REPO
from photos import photo, save_jpeg_with_orientation
from serving_helpers import GatedRunner

TIMEOUT = 300
#: The photo: larger than the window shows it, so that the page has to scale the brush and
#: send its mask at the photo's resolution, not the screen's.
HEIGHT, WIDTH = 900, 1200
WINDOW = (1024, 800)
SCREENSHOT = os.path.join(REPO, "docs", "web_page.png")
#: The browser test's programs: Debian package of each.
BROWSER = {"chromium": "chromium", "chromedriver": "chromium-driver"}


@pytest.fixture(scope="module")
def net():
    # The bundled demo checkpoint rather than random weights: the screenshot shows a removal.
    return glcic_fast.load(DEMO_WEIGHTS).eval()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium through chromedriver (both Debian's; scripts/setup.sh installs them
    where it can: as root, with apt-get)."""
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="the browser test needs selenium: pip install 'glcic_fast[test]'")
    missing = [package for program, package in BROWSER.items() if shutil.which(program) is None]
    if missing:
        message = (f"the browser test needs {' and '.join(missing)}: apt-get install {' '.join(BROWSER.values())} "
                   "(scripts/setup.sh does, as root)")
        if os.geteuid() == 0 and shutil.which("apt-get"):  # setup.sh's reach: not skipped, or CI would skip it
            pytest.fail(f"{message}; this machine is in scripts/setup.sh's reach: run it")
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    # --no-sandbox: Chromium refuses to run as root with its sandbox (CI runs as root).
    # A profile of its own under pytest's tmp dir: otherwise each run leaves one in /tmp.
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    driver.set_script_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def photo_file(tmp_path):
    path = tmp_path / "astronaut.png"
    write_image(path, photo("astronaut", HEIGHT, WIDTH))
    return path


def _by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _wait(driver, condition, message):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, TIMEOUT, poll_frequency=0.05).until(lambda d: condition(d), message)


def _bytes_at(driver, url) -> bytes:
    """What the page gets when it fetches ``url`` (a blob: URL of its own, say)."""
    data = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then((r) => r.blob()).then((blob) => {
          const reader = new FileReader();
          reader.onload = () => done(reader.result.split(",")[1]);
          reader.readAsDataURL(blob);
        });""", url)
    return base64.b64decode(data)


def _record_uploads(driver):
    """Keeps each mask the page POSTs (as a blob: URL in window.sentMasks): the test checks
    the mask the service got, not the one it thinks the page drew."""
    driver.execute_script("""
        const fetchAsThePageDoes = window.fetch;
        window.sentMasks = [];
        window.fetch = (url, init) => {
          if (init && init.body instanceof FormData) window.sentMasks.push(URL.createObjectURL(init.body.get("mask")));
          return fetchAsThePageDoes(url, init);
        };""")


def _open(driver, url, path):
    driver.get(f"{url}/")
    _by_id(driver, "file").send_keys(str(path))  # the file picker's input, as a chosen file
    _wait(driver, lambda d: f"{WIDTH} × {HEIGHT}" in _by_id(d, "status").text, "the photo did not open")
    _record_uploads(driver)


def _stroke(driver, start, end, steps=12):
    """Drags the mouse over the mask canvas from ``start`` to ``end`` (fractions of its shown
    width and height); returns the stroke's ends and the brush's diameter in the photo's
    pixels, and the photo's scale on screen."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = _by_id(driver, "mask")
    shown = driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];",
                                  canvas)
    scale = WIDTH / shown[0]
    # Selenium's offsets are from the element's centre, in whole CSS pixels.
    points = [(round((f[0] - 0.5) * shown[0]), round((f[1] - 0.5) * shown[1])) for f in (start, end)]
    actions = ActionChains(driver).move_to_element_with_offset(canvas, *points[0]).click_and_hold()
    moved = points[0]
    for i in range(1, steps + 1):
        to = tuple(round(a + (b - a) * i / steps) for a, b in zip(*points))
        actions.move_by_offset(to[0] - moved[0], to[1] - moved[1])
        moved = to
    actions.release().perform()
    ends = [((x + shown[0] / 2) * scale, (y + shown[1] / 2) * scale) for x, y in points]
    return ends, float(_by_id(driver, "size").get_attribute("value")) * scale, scale


def _distance_to_segment(height, width, a, b):
    """Each pixel centre's distance to the segment a-b (photo pixels)."""
    y, x = np.mgrid[0:height, 0:width] + 0.5
    a, b = np.array(a), np.array(b)
    t = np.clip(((x - a[0]) * (b - a)[0] + (y - a[1]) * (b - a)[1]) / max(np.dot(b - a, b - a), 1e-9), 0, 1)
    return np.hypot(x - (a[0] + t * (b - a)[0]), y - (a[1] + t * (b - a)[1]))


def _remove_and_wait(driver):
    _by_id(driver, "remove").click()
    _wait(driver, lambda d: _by_id(d, "result-section").is_displayed() or _by_id(d, "error").is_displayed(),
          "neither a result nor an error appeared")
    assert not _by_id(driver, "error").is_displayed(), _by_id(driver, "error").text


def _write_screenshot(driver):
    """The whole page (beyond the window), as Chromium renders it."""
    height = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"]
    # The window's width, not the content's: the capture lays the page out again without the
    # scroll bar, at that width.
    width = driver.execute_script("return innerWidth")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    with open(SCREENSHOT, "wb") as f:
        f.write(base64.b64decode(shot["data"]))


def test_the_page_and_its_files_are_served_with_their_types_and_no_outside_address(net):
    with running(create_app(net, ServiceConfig()), ready=False) as url:
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sorted(linked) == ["static/app.css", "static/app.js"]
        served = {"page": page.text}
        for path, kind in (("static/app.css", "text/css"), ("static/app.js", "javascript")):
            response = httpx.get(f"{url}/{path}")
            assert response.status_code == 200
            assert kind in response.headers["content-type"]
            served[path] = response.text
        for name, text in served.items():
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), \
                f"{name} names an outside address: the page must work offline"
        assert httpx.get(f"{url}/static/missing.js").status_code == 404


def test_paint_remove_compare_download(net, browser, photo_file, tmp_path):
    with running(create_app(net, ServiceConfig())) as url:
        _open(browser, url, photo_file)
        ends, brush, scale = _stroke(browser, (0.35, 0.45), (0.65, 0.55))
        assert scale > 1.2  # the photo is shown scaled down: the page must map strokes back
        assert _by_id(browser, "postprocess").is_selected()
        _remove_and_wait(browser)

        sent_mask = tmp_path / "sent_mask.png"
        sent_mask.write_bytes(_bytes_at(browser, browser.execute_script("return window.sentMasks[0]")))
        download = _by_id(browser, "download")
        assert download.get_attribute("download").endswith(".png")
        answer = tmp_path / "answer.png"
        answer.write_bytes(_bytes_at(browser, download.get_attribute("href")))
        assert _bytes_at(browser, _by_id(browser, "result").get_attribute("src")) == answer.read_bytes()

        if os.environ.get("GLCIC_FAST_WRITE_SCREENSHOT") == "1":
            _write_screenshot(browser)

        # The comparison: the slider moves where "after" begins.
        from selenium.webdriver.common.keys import Keys

        _by_id(browser, "split").send_keys(Keys.HOME)
        assert browser.execute_script("return getComputedStyle(document.getElementById('result')).clipPath") == \
            "inset(0px 0px 0px 0%)"

    # The mask: the photo's size, white along the stroke, black beyond the brush's reach.
    hole = cv2.imread(str(sent_mask), cv2.IMREAD_GRAYSCALE)
    assert hole.shape == (HEIGHT, WIDTH)
    distance = _distance_to_segment(HEIGHT, WIDTH, *ends)
    assert (hole[distance < brush / 2 - 2 * scale] == 255).all()
    assert (hole[distance > brush / 2 + 2 * scale] == 0).all()

    source = cv2.imread(str(photo_file), cv2.IMREAD_UNCHANGED)
    result = cv2.imread(str(answer), cv2.IMREAD_UNCHANGED)
    assert result.shape == source.shape and result.dtype == source.dtype
    assert np.array_equal(result[hole == 0], source[hole == 0])
    on_stroke = distance < brush / 4
    assert not np.array_equal(result[on_stroke], source[on_stroke])
    want = glcic_fast.complete(str(photo_file), str(sent_mask), weights=net, postprocess=True)
    # As the HTTP tests: rounding to the PNG's 8 bits, which the blend may tip by a level.
    assert (read_image(answer) - want).abs().max().item() <= 1.5 / 255 + 1e-5


def _decoded(data: bytes) -> np.ndarray:
    """H x W x 3 RGB uint8 of an image file's bytes, as stored (no EXIF orientation)."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return bgr[:, :, ::-1].astype(np.int16)


def _phone_photo(tmp_path, orientation, big_endian=False):
    """A real photo stored 1200 x 900 as a JPEG whose EXIF orientation says how to show it;
    (its path, its pixels as stored as OpenCV decodes them)."""
    pytest.importorskip("PIL.Image")
    path = tmp_path / f"phone-{orientation}.jpg"
    stored = (photo("astronaut", HEIGHT, WIDTH).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    save_jpeg_with_orientation(path, stored, orientation, big_endian)
    return path, _decoded(path.read_bytes())


def _drawn_photo(driver) -> np.ndarray:
    return _decoded(base64.b64decode(driver.execute_script(
        "return document.getElementById('photo').toDataURL('image/png').split(',')[1]")))


def _same_photo(a, b) -> bool:
    """Chromium's and OpenCV's JPEG decoders may round differently; turned or flipped, a
    photo differs everywhere."""
    return a.shape == b.shape and np.abs(a - b).mean() < 1.0


@pytest.mark.parametrize("orientation, big_endian", [(o, False) for o in range(1, 9)] + [(3, True), (6, True)],
                         ids=[f"{o}" for o in range(1, 9)] + ["3-big-endian", "6-big-endian"])
def test_a_photo_is_drawn_as_its_pixels_are_stored_whatever_its_exif_orientation(net, browser, tmp_path,
                                                                                 orientation, big_endian):
    """Browsers show a JPEG turned or mirrored as its EXIF orientation (2 to 8) says; the
    service completes the pixels as stored. The page draws them as stored (and says why),
    whichever byte order the EXIF block has."""
    path, file_pixels = _phone_photo(tmp_path, orientation, big_endian)
    with running(create_app(net, ServiceConfig()), ready=False) as url:
        _open(browser, url, path)  # waits for the stored size, 1200 x 900, in the status line
        assert ("EXIF orientation" in _by_id(browser, "status").text) == (orientation > 1)
        assert _same_photo(_drawn_photo(browser), file_pixels)


@pytest.mark.parametrize("orientation", [3, 6], ids=["turned-180", "turned-90"])
def test_a_phone_photo_is_painted_and_completed_as_stored(net, browser, tmp_path, orientation):
    """Painted on a photo with an EXIF orientation, a stroke removes what was under the
    brush on screen, not something elsewhere in the file; "before" in the comparison is as
    stored, like the result."""
    path, file_pixels = _phone_photo(tmp_path, orientation)
    with running(create_app(net, ServiceConfig())) as url:
        _open(browser, url, path)
        ends, brush, scale = _stroke(browser, (0.2, 0.3), (0.4, 0.35))  # off-centre: a turn would move it
        _remove_and_wait(browser)
        hole = cv2.imdecode(np.frombuffer(_bytes_at(browser, browser.execute_script("return window.sentMasks[0]")),
                                          np.uint8), cv2.IMREAD_GRAYSCALE)
        before = _decoded(_bytes_at(browser, _by_id(browser, "before").get_attribute("src")))
        result = _decoded(_bytes_at(browser, _by_id(browser, "download").get_attribute("href")))
    distance = _distance_to_segment(HEIGHT, WIDTH, *ends)
    assert hole.shape == (HEIGHT, WIDTH) and (hole[distance < brush / 2 - 2 * scale] == 255).all()
    assert _same_photo(before, file_pixels)
    assert np.array_equal(result[hole == 0], file_pixels[hole == 0])
    assert not np.array_equal(result[distance < brush / 4], file_pixels[distance < brush / 4])


def test_a_photo_over_the_limit_shows_the_services_413_message(net, browser, photo_file):
    config = ServiceConfig(max_pixels=HEIGHT * WIDTH - 1)
    with running(create_app(net, config)) as url:
        refused = httpx.post(f"{url}/v1/complete", files={"image": photo_file.read_bytes()},
                             data={"rects": "0,0,8,8"}, timeout=TIMEOUT)
        assert refused.status_code == 413
        _open(browser, url, photo_file)
        _stroke(browser, (0.4, 0.5), (0.6, 0.5))
        _by_id(browser, "remove").click()
        error = _by_id(browser, "error")
        _wait(browser, lambda d: error.is_displayed(), "the refusal was not shown")
        assert "Too large" in error.text
        assert refused.json()["error"] in error.text
        assert not _by_id(browser, "result-section").is_displayed()
        _wait(browser, lambda d: _by_id(d, "remove").is_enabled(), "the page stayed busy after the refusal")


def test_busy_while_running_and_a_full_queue_shows_the_services_503_message(net, browser, photo_file):
    runner = GatedRunner(net)
    with running(create_app(net, ServiceConfig(max_queue=1), runner=runner)) as url:
        _open(browser, url, photo_file)
        _stroke(browser, (0.4, 0.5), (0.6, 0.5))
        stage, remove = _by_id(browser, "stage"), _by_id(browser, "remove")
        with concurrent.futures.ThreadPoolExecutor(1) as pool, runner.held():
            # Another client holds the only place in the queue.
            other = pool.submit(httpx.post, f"{url}/v1/complete", files={"image": photo_file.read_bytes()},
                                data={"rects": "0,0,8,8"}, timeout=TIMEOUT)
            assert runner.entered.wait(60)
            refused = httpx.post(f"{url}/v1/complete", files={"image": photo_file.read_bytes()},
                                 data={"rects": "0,0,8,8"}, timeout=TIMEOUT)
            assert refused.status_code == 503
            remove.click()
            error = _by_id(browser, "error")
            _wait(browser, lambda d: error.is_displayed(), "the refusal was not shown")
            assert "busy" in error.text and f"try again in {refused.headers['Retry-After']} s" in error.text
            assert refused.json()["error"] in error.text
            runner.gate.set()
            assert other.result().status_code == 200

        with runner.held():  # the page's own request waits in the engine: the page says it is busy
            runner.entered.clear()
            remove.click()
            assert runner.entered.wait(60)
            assert stage.get_attribute("aria-busy") == "true"
            assert not remove.is_enabled()
            assert "Removing" in _by_id(browser, "status").text
        _wait(browser, lambda d: _by_id(d, "result-section").is_displayed(), "no result after the wait")
        assert stage.get_attribute("aria-busy") == "false"
        assert not _by_id(browser, "error").is_displayed()


def test_keyboard_paints_switches_tools_and_undoes(net, browser, photo_file):
    from selenium.webdriver.common.keys import Keys

    with running(create_app(net, ServiceConfig()), ready=False) as url:
        _open(browser, url, photo_file)
        remove, canvas = _by_id(browser, "remove"), _by_id(browser, "mask")
        assert not remove.is_enabled()  # nothing painted yet
        canvas.send_keys(Keys.ARROW_RIGHT, Keys.SPACE)
        assert remove.is_enabled()
        canvas.send_keys("r")
        assert browser.find_element("css selector", 'input[name="tool"][value="rect"]').is_selected()
        canvas.send_keys(Keys.SPACE, Keys.ARROW_DOWN, Keys.ARROW_DOWN, Keys.SPACE)  # one corner, then the other
        canvas.send_keys(Keys.CONTROL, "z")
        assert remove.is_enabled()  # the dot is left
        canvas.send_keys(Keys.CONTROL, "z")
        assert not remove.is_enabled()
        assert _by_id(browser, "status").text == "Undone."
        canvas.send_keys(Keys.CONTROL, "z")  # nothing left to undo: no error
        assert not _by_id(browser, "error").is_displayed()
