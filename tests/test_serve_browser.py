"""The web page of `clipengine serve`, in a real browser: Debian's Chromium, driven by Playwright (no browser
download: `make test` installs the chromium package). The page is served by a real `clipengine serve`."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from conftest import write_photos
from serving import start_service

from clipengine.index.pipeline import index_folder

CHROMIUM = os.environ.get("CLIPENGINE_CHROMIUM", "/usr/bin/chromium")
# the flags a closed network needs: without them Chromium keeps trying to reach Google's services
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
K = 6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model, _export_cache):
    """A real `clipengine serve` over 12 indexed photos; yields (url, photo paths)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package (apt-get install chromium)")
    root = tmp_path_factory.mktemp("browser")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CLIPENGINE_CACHE_DIR", str(_export_cache))
        photos = write_photos(root / "photos")
        index_folder(photos, root / "idx", model=tiny_model, workers=0)
    process, url = start_service(root / "idx")
    yield url, sorted(photos.rglob("*.jpg"))
    process.send_signal(signal.SIGINT)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, service):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # (a refused request logs "Failed to load resource": the tests check what the page shows for those)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Failed to load" not in m.text else None)
    page.goto(service[0] + "/")
    yield page
    context.close()
    assert not errors, errors  # no script error along the way


def thumbnails_loaded(page) -> list[int]:
    """The natural widths of the result thumbnails once each has loaded (0: broken)."""
    page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete)")
    return page.eval_on_selector_all(".hit img", "imgs => imgs.map(i => i.naturalWidth)")


def test_type_a_query_see_k_thumbnails_then_more_like_this(page, service, tmp_path):
    page.fill("#k", str(K))
    page.fill("#query", "a photo of a lake")
    page.keyboard.press("Enter")
    page.wait_for_selector(f".hit >> nth={K - 1}")
    assert page.locator(".hit").count() == K
    assert all(w > 0 for w in thumbnails_loaded(page))  # every thumbnail rendered
    assert f"{K} results" in page.inner_text("#status")
    assert "q=a+photo+of+a+lake" in page.url  # the search can be shared or reloaded

    third = page.locator(".hit").nth(2)
    clicked_path = third.locator(".path").inner_text()
    third.focus()
    page.keyboard.press("Enter")  # keyboard: a result is a button
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('6 results for images like')")
    assert page.locator(".hit .path").first.inner_text() == clicked_path  # the image itself comes first
    assert page.locator(".hit .score").first.inner_text().endswith("1.000")
    assert all(w > 0 for w in thumbnails_loaded(page))
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    if os.environ.get("CLIPENGINE_SCREENSHOT"):  # how the README's picture is made
        shutil.copy(tmp_path / "page.png", os.environ["CLIPENGINE_SCREENSHOT"])
    assert_shows(tmp_path / "page.png", page, page.locator(".hit img").first, Path(clicked_path))


def assert_shows(screenshot: Path, page, element, original: Path) -> None:
    """The screenshot shows `original` where `element` is: its pixels, scaled into the element's box as the
    page's CSS does (object-fit: contain), match the screenshot's there (a blank or wrong page does not)."""
    from PIL import Image, ImageChops, ImageStat

    shot = Image.open(screenshot).convert("RGB")
    box = element.bounding_box()
    scroll_x, scroll_y = page.evaluate("[window.scrollX, window.scrollY]")
    width, height = round(box["width"]), round(box["height"])
    drawn = Image.open(original).convert("RGB")
    drawn.thumbnail((width, height), Image.Resampling.LANCZOS)
    left = round(box["x"] + scroll_x) + (width - drawn.width) // 2
    top = round(box["y"] + scroll_y) + (height - drawn.height) // 2
    seen = shot.crop((left, top, left + drawn.width, top + drawn.height))
    assert min(drawn.size) >= 64 and ImageStat.Stat(seen).stddev[0] > 5  # a picture, not an empty box
    difference = ImageStat.Stat(ImageChops.difference(seen, drawn)).mean
    assert max(difference) < 20, difference  # the same picture (scaled twice, recompressed once)


def test_upload_an_image_and_see_errors_as_text(page, service, tmp_path):
    _, photos = service
    page.fill("#k", "4")
    page.set_input_files("#image", str(photos[5]))
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('4 results')")
    assert page.locator(".hit .path").first.inner_text() == str(photos[5])
    assert all(w > 0 for w in thumbnails_loaded(page))

    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image at all")
    page.set_input_files("#image", str(not_image))
    page.wait_for_function("document.querySelector('#status').classList.contains('error')")
    assert "cannot use the uploaded image" in page.inner_text("#status") and page.locator(".hit").count() == 0


def test_info_and_slash_focuses_the_search_box(page):
    page.click("#show-info")
    page.wait_for_selector("#info:not([hidden])")
    assert "12 searchable" in page.inner_text("#info")
    page.locator("#show-info").focus()
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "query"


@pytest.mark.parametrize("how", ["paste", "drop"])
def test_paste_or_drop_an_image(page, service, how):
    _, photos = service
    page.fill("#k", "3")
    first = page.evaluate("fetch('/api/similar/1?k=1').then(r => r.json()).then(h => h[0])")  # an indexed image
    page.evaluate("""async ([how, id]) => {
        const blob = await (await fetch(`/api/file/${id}`)).blob();
        const data = new DataTransfer();
        data.items.add(new File([blob], "query.jpg", {type: "image/jpeg"}));
        const event = how === "paste" ? new ClipboardEvent("paste", {clipboardData: data, bubbles: true})
                                      : new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true});
        document.dispatchEvent(event);
    }""", [how, first["id"]])
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('3 results for the image')")
    assert page.locator(".hit .path").first.inner_text() == first["path"]
    assert page.locator("#drop").is_hidden()


def test_a_video_hit_shows_its_matching_frame_and_opens_at_that_moment(browser, tmp_path, tiny_model, _export_cache):
    from synthetic import write_video

    folder = tmp_path / "lib"
    folder.mkdir()
    write_video(folder / "clip.mp4", [(3, None), (3, (200, 30, 30))])  # its only kept frame: the red one, at 0:03
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CLIPENGINE_CACHE_DIR", str(_export_cache))
        index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    process, url = start_service(tmp_path / "idx")
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(url + "/?q=red")
        page.wait_for_selector(".hit")
        assert page.locator(".hit .moment").inner_text() == "at 0:03"
        assert page.locator(".hit a.view").get_attribute("href").endswith("#t=3.00")  # the player starts there
        assert "t=3" in page.locator(".hit img").get_attribute("src")
        assert thumbnails_loaded(page) == [160]  # the frame at 0:03, at the video's own size (160x120)
        red = page.evaluate("""async () => {
            const img = document.querySelector('.hit img');
            const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
            const g = c.getContext('2d'); g.drawImage(img, 0, 0); return Array.from(g.getImageData(4, 4, 1, 1).data);
        }""")
        assert red[0] > 150 and red[1] < 80  # the red scene's frame, not the black intro
        context.close()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def test_filter_by_place_see_dates_and_places_grouped_by_day(browser, tmp_path, tiny_model, _export_cache):
    from test_metadata import exif_of

    from clipengine.scenes import photo_like

    folder = tmp_path / "trips"
    folder.mkdir()
    for i, (name, taken, gps) in enumerate([("b1.jpg", "2023:05:01 10:00:00", (52.52, 13.405)),
                                            ("b2.jpg", "2023:05:02 09:00:00", (52.5163, 13.3777)),
                                            ("b3.jpg", "2023:05:01 18:00:00", (52.5076, 13.3904)),
                                            ("p1.jpg", "2023:07:14 18:00:00", (48.8566, 2.3522))]):
        photo_like(160, 120, seed=i).save(folder / name, "JPEG", exif=exif_of(taken, "+02:00", gps=gps).tobytes())
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CLIPENGINE_CACHE_DIR", str(_export_cache))
        index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    process, url = start_service(tmp_path / "idx")
    try:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.goto(url + "/")
        page.fill("#query", "a photo")
        page.fill("#place", "berlin")
        page.select_option("#sort", "-date")
        page.select_option("#group", "day")
        page.click("button[type=submit]")
        page.wait_for_selector(".hit")
        assert page.locator(".group").all_inner_texts() == ["2023-05-02", "2023-05-01"]  # newest first, by day
        assert page.locator(".hit .taken").all_inner_texts() == ["2023-05-02", "2023-05-01", "2023-05-01"]
        assert all("State of Berlin, Germany" in p for p in page.locator(".hit .place").all_inner_texts())
        times = page.locator(".hit .path").all_inner_texts()
        assert [Path(p).name for p in times] == ["b2.jpg", "b3.jpg", "b1.jpg"]  # 18:00 before 10:00 on the 1st
        page.fill("#place", "")
        page.fill("#ext", "png")  # none are: an empty answer, not an error
        page.click("button[type=submit]")
        page.wait_for_function("document.querySelectorAll('.hit').length === 0")
        assert page.locator("#status").inner_text().startswith("no results")
        page.fill("#ext", "")
        page.fill("#near", "48.85,2.35,5")  # a radius without its unit: the error, as the CLI says it
        page.click("button[type=submit]")
        page.wait_for_selector("#status.error")
        assert "needs a unit" in page.locator("#status").inner_text() and page.locator(".hit").count() == 0
        context.close()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
