"""The gallery page in headless Chromium, as a new user meets it: the timeline without a query (month headings,
infinite scroll), filters, the viewer (arrows, keys, date, camera, place), similar photos, a negative-only query
told in words, a transparent PNG on a checkerboard, a phone's layout and a video moment playing from its time.

One browser for the module. Each state is saved as a screenshot, for a person to look at, in
``$CLIPWORKS_SCREENSHOTS`` (``screenshots/`` in the checkout is git-ignored for it) or a temporary folder; the run
prints which."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import pytest
from fastapi.responses import FileResponse
from PIL import Image

from browser_helpers import browser
from clipworks.library import Library, make_filters
from clipworks.service import ServiceSettings, create_app, gallery
from conftest import serve_app
from library_helpers import Shot, exif_of, file_ids, make_variants, write_shots

PARIS, TOKYO = (48.8584, 2.2945), (35.6586, 139.7454)
# Newest first, as the timeline shows them; the copy is the same photo as the first, in another folder.
SHOTS = [
    Shot("2024/eiffel.jpg", "2024:08:03 10:15:00", "+02:00", PARIS, "Canon", "EOS R5", "RF24-70mm F2.8 L"),
    Shot("copies/eiffel.jpg", "2024:08:03 10:15:00", "+02:00", PARIS, "Canon", "EOS R5", "RF24-70mm F2.8 L"),
    Shot("2024/seine.jpg", "2024:08:01 19:40:00", "+02:00", PARIS, "Apple", "iPhone 15 Pro"),
    Shot("2024/market.jpg", "2024:07:20 09:00:00", None, None, "Canon", "EOS R5"),
    Shot("2024/shrine.jpg", "2024:07:02 14:30:00", "+09:00", TOKYO, "Apple", "iPhone 15 Pro"),
    Shot("2024/garden.jpg", "2024:06:15 16:00:00", None, None, "Canon", "EOS R5"),
    Shot("2024/station.jpg", "2024:06:01 08:00:00", None, None, "Apple", "iPhone 15 Pro"),
]
VARIANT_DATES = ["2023:12:24 18:00:00", "2023:12:20 12:00:00", "2023:12:11 12:00:00", "2023:12:02 12:00:00"]
LOGO_TIME = 1699185600.0  # 2023-11-05 12:00 UTC: the PNG has no EXIF, its file time counts
PAGE = 5  # the page size the tests ask for (?k=5): three pages of twelve photos
DESKTOP = {"width": 1280, "height": 700, "deviceScaleFactor": 1, "mobile": False}
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": True}
MOMENT = 1.5  # seconds into the test video


def write_library_folder(photos: list[Path], root: Path) -> None:
    sources = photos[:6]
    write_shots(sources, root, [s for s in SHOTS if not s.name.startswith("copies/")])
    (root / "copies").mkdir()
    shutil.copy(root / "2024" / "eiffel.jpg", root / "copies" / "eiffel.jpg")
    for path, taken in zip(make_variants(sources, root / "2023", 4), VARIANT_DATES, strict=True):
        image = Image.open(path)
        image.save(path, exif=exif_of(Shot(path.name, taken, None, None, "FUJIFILM", "X-T4")))
    # A transparent PNG: a red disc on nothing.
    logo = Image.new("RGBA", (240, 240), (0, 0, 0, 0))
    from PIL import ImageDraw

    ImageDraw.Draw(logo).ellipse((40, 40, 200, 200), fill=(220, 40, 40, 255))
    logo.save(root / "2023" / "logo.png")
    os.utime(root / "2023" / "logo.png", (LOGO_TIME, LOGO_TIME))


def write_video(path: Path, seconds: int = 4, fps: int = 10) -> None:
    """A tiny VP8 WebM (what Chromium plays without proprietary codecs): a colour a second."""
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for n in range(seconds * fps):
            rgb = np.zeros((48, 64, 3), np.uint8)
            rgb[..., n // fps % 3] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def model(vit_bundle):
    import clipworks

    return clipworks.load(vit_bundle)


@pytest.fixture(scope="module")
def library(model, photos, tmp_path_factory) -> Library:
    root = tmp_path_factory.mktemp("browser") / "photos"
    write_library_folder(photos, root)
    lib = Library(root.parent / "lib.db", model, create=True)
    lib.index([root], batch_size=8)
    yield lib
    lib.close()


@pytest.fixture(scope="module")
def server(model, library, tmp_path_factory):
    folder = tmp_path_factory.mktemp("svc")
    video = folder / "moment.webm"
    write_video(video)
    settings = ServiceSettings(tags=["dog", "cat"], tags_cache_dir=folder / "tags")
    app = create_app(settings, model=model, library=library, routers=[gallery.router])
    # A stand-in for the video moments' media route (FileResponse answers Range requests, as that one must).
    app.add_api_route("/test-media/moment.webm", lambda: FileResponse(video, media_type="video/webm"))
    with pytest.MonkeyPatch.context() as env, serve_app(app) as url:
        env.setenv("CLIPWORKS_HOME", str(folder / "cache"))  # the thumbnails' cache
        yield url


@pytest.fixture(scope="module")
def shots(request, tmp_path_factory) -> Path:
    folder = Path(os.environ.get("CLIPWORKS_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"gallery screenshots: {folder}")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    d = browser(tmp_path_factory.mktemp("chrome"), "--autoplay-policy=no-user-gesture-required")
    yield d
    d.quit()


@pytest.fixture
def page(driver, server):
    """The driver on a desktop-sized window, with the page's state from an earlier test gone."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", DESKTOP)

    def open_page(query: str = "") -> object:
        driver.get(f"{server}/?k={PAGE}{query}")
        wait(driver, lambda d: d.execute_script("return !!document.querySelector('#results .tile, .empty')"))
        return driver

    return open_page


def wait(driver, condition, timeout: float = 20):  # type: ignore[no-untyped-def]
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def tile_ids(driver) -> list[int]:  # type: ignore[no-untyped-def]
    return [
        int(i) for i in driver.execute_script("return [...document.querySelectorAll('.tile')].map(t => t.dataset.id)")
    ]


def images_loaded(driver) -> bool:  # type: ignore[no-untyped-def]
    return driver.execute_script(
        "return [...document.querySelectorAll('.tile img, #media img')].every(i => i.complete && i.naturalWidth > 0)"
    )


def snap(driver, shots: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    wait(driver, images_loaded)
    driver.save_screenshot(str(shots / f"{name}.png"))


def ids_by_name(library: Library) -> dict[str, int]:
    root = Path(library.path).parent / "photos"
    return {str(Path(p).relative_to(root)): i for p, i in file_ids(library.path).items()}


def test_timeline_opens_on_the_newest_photos_grouped_by_month(page, library, shots) -> None:
    driver = page()
    everything = library.recent(top_k=100)
    assert len(everything) == 12
    wait(
        driver,
        lambda d: not d.execute_script("return document.querySelector('#more .spinner')") or len(tile_ids(d)) > PAGE,
    )
    shown = tile_ids(driver)
    assert shown == everything[: len(shown)] and PAGE <= len(shown) < 12  # pages enough to fill the screen
    headings = driver.execute_script("return [...document.querySelectorAll('.month h2')].map(h => h.textContent)")
    assert headings[:2] == ["August 20243 items", "July 20242 items"]
    assert driver.find_element("id", "title").text == "Photos"
    assert "12 items" in driver.find_element("id", "status").text
    snap(driver, shots, "01-timeline")


def test_infinite_scroll_loads_every_page_once(page, library, shots) -> None:
    driver = page()
    before = len(tile_ids(driver))
    assert before < 12
    for _ in range(3):
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        wait(driver, lambda d, n=before: len(tile_ids(d)) > n or "That is all" in d.find_element("id", "more").text)
        before = len(tile_ids(driver))
    wait(driver, lambda d: "That is all" in d.find_element("id", "more").text)
    assert tile_ids(driver) == library.recent(top_k=100)
    months = driver.execute_script("return [...document.querySelectorAll('.month')].map(m => m.dataset.month)")
    assert months == ["2024-08", "2024-07", "2024-06", "2023-12", "2023-11"]  # a month split by a page is one
    snap(driver, shots, "02-timeline-scrolled")


def test_a_filter_narrows_the_timeline(page, library, shots) -> None:
    driver = page()
    driver.find_element("id", "filters-button").click()
    box = driver.find_element("css selector", "#filter-form input[name=camera]")
    box.send_keys("iphone")
    driver.execute_script("arguments[0].dispatchEvent(new Event('change', {bubbles: true}))", box)
    want = library.recent(top_k=100, filters=make_filters(camera="iphone"))
    assert 0 < len(want) < 12
    wait(driver, lambda d: tile_ids(d) == want)
    assert "camera=iphone" in driver.current_url
    assert driver.find_element("id", "filter-count").text == "1"
    chips = driver.find_elements("css selector", "#active .chip")
    assert [c.text for c in chips] == ["camera iphone"]
    snap(driver, shots, "03-filtered")
    chips[0].click()  # removing the chip brings every photo back
    wait(driver, lambda d: tile_ids(d)[:PAGE] == library.recent(top_k=PAGE))


def test_the_viewer_opens_steps_and_tells_when_where_and_with_what(page, library, shots) -> None:
    from selenium.webdriver.common.keys import Keys

    driver = page()
    ids = ids_by_name(library)
    tiles = driver.find_elements("css selector", ".tile")
    tiles[0].click()
    wait(driver, lambda d: d.execute_script("return document.getElementById('viewer').open"))
    name = lambda: driver.find_element("id", "v-name").text  # noqa: E731
    facts = lambda: driver.find_element("id", "v-facts").text  # noqa: E731
    assert name() == "eiffel.jpg"
    assert "Sat, 3 Aug 2024" in facts() or "Sat, Aug 3, 2024" in facts()
    assert "10:15" in facts() and "UTC+02:00" in facts()  # the wall clock where it was taken, with its zone
    assert "Canon EOS R5" in facts() and "RF24-70mm F2.8 L" in facts()
    assert "48.8584\u00b0 N, 2.2945\u00b0 E" in facts()
    original = driver.find_element("id", "v-original").get_attribute("href")
    assert original.endswith(f"/original/{ids['2024/eiffel.jpg']}")
    wait(driver, lambda d: d.execute_script("return document.querySelector('#media img').src.includes('size=1600')"))
    snap(driver, shots, "04-viewer")

    driver.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    wait(driver, lambda d: driver.find_element("id", "pos").text.startswith("2 of"))
    driver.find_element("id", "next").click()
    wait(driver, lambda d: name() == "seine.jpg")
    assert "iPhone 15 Pro" in facts()
    for _ in range(3):  # past the first page: the viewer loads the next one
        driver.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    wait(driver, lambda d: driver.find_element("id", "pos").text.startswith("6 of"))
    assert name() == "garden.jpg" and len(tile_ids(driver)) >= 6
    driver.switch_to.active_element.send_keys(Keys.ARROW_LEFT)
    wait(driver, lambda d: name() == "shrine.jpg")
    assert "35.6586\u00b0 N, 139.7454\u00b0 E" in facts() and "UTC+09:00" in facts()
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait(driver, lambda d: not d.execute_script("return document.getElementById('viewer').open"))
    focused = driver.switch_to.active_element
    assert focused.get_attribute("data-id") == str(ids["2024/shrine.jpg"])  # focus back on the photo last seen


def test_similar_photos_from_the_viewer(page, library, shots) -> None:
    driver = page()
    ids = ids_by_name(library)
    driver.find_elements("css selector", ".tile")[2].click()
    wait(driver, lambda d: d.find_element("id", "v-name").text == "seine.jpg")
    driver.find_element("id", "v-similar").click()
    wait(driver, lambda d: d.current_url.endswith(f"id={ids['2024/seine.jpg']}&k={PAGE}"))
    want = library.search(images=[Path(library.path).parent / "photos" / "2024" / "seine.jpg"], top_k=PAGE)
    root = Path(library.path).parent / "photos"
    wait(driver, lambda d: tile_ids(d)[:PAGE] == [ids[str(Path(h.path).relative_to(root))] for h in want])
    assert driver.find_element("id", "title").text == "Similar photos"
    assert "like seine.jpg" in driver.find_element("id", "example").text
    score = driver.find_element("css selector", ".tile").get_attribute("data-score")
    assert float(score) == pytest.approx(1.0, abs=1e-4)
    snap(driver, shots, "05-similar")


def test_text_search_then_a_negative_only_query_is_told_in_words(page, library, shots) -> None:
    from selenium.webdriver.common.keys import Keys

    driver = page()
    box = driver.find_element("id", "q")
    box.send_keys("a photo of a dog", Keys.ENTER)
    want = library.search("a photo of a dog", top_k=PAGE)
    root = Path(library.path).parent / "photos"
    ids = ids_by_name(library)
    wait(driver, lambda d: tile_ids(d)[:PAGE] == [ids[str(Path(h.path).relative_to(root))] for h in want])
    assert driver.find_element("id", "title").text == "\u201ca photo of a dog\u201d"

    box = driver.find_element("id", "q")
    box.clear()
    box.send_keys("-people", Keys.ENTER)
    error = wait(driver, lambda d: d.find_element("id", "error").is_displayed() and d.find_element("id", "error"))
    text = error.text
    assert text.startswith("A query needs at least one positive term") and text.endswith(".")
    assert "400" not in text and "--" not in text and "detail" not in text
    snap(driver, shots, "06-negative-only")


def test_a_transparent_png_shows_on_a_checkerboard(page, library, server, shots) -> None:
    driver = page()
    ids = ids_by_name(library)
    logo = ids["2023/logo.png"]
    r = httpx.get(f"{server}/thumb/{logo}")
    assert r.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.mode == "RGBA" and im.getpixel((2, 2))[3] == 0 and im.getpixel((128, 128))[3] == 255
    driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    selector = f".tile[data-id='{logo}'] img"
    wait(driver, lambda d: d.find_elements("css selector", selector))
    img = driver.find_element("css selector", selector)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", img)
    wait(driver, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img))
    style = driver.execute_script("return getComputedStyle(arguments[0]).backgroundImage", img)
    assert style.count("linear-gradient") == 4
    corner_alpha = driver.execute_script(
        "const i = arguments[0], c = document.createElement('canvas'); c.width = i.naturalWidth; "
        "c.height = i.naturalHeight; const g = c.getContext('2d'); g.drawImage(i, 0, 0); "
        "return g.getImageData(2, 2, 1, 1).data[3];",
        img,
    )
    assert corner_alpha == 0  # what shows there is the checkerboard behind the image
    snap(driver, shots, "07-transparent")


def test_hiding_near_duplicates_folds_the_copy(page, library, shots) -> None:
    driver = page()
    ids = ids_by_name(library)
    driver.find_element("id", "filters-button").click()
    driver.find_element("css selector", "#filter-form input[name=dedupe]").click()
    copy = ids["copies/eiffel.jpg"]
    # A page is drawn whole: once there are tiles, the first page is all there.
    wait(driver, lambda d: "dedupe=true" in d.current_url and tile_ids(d) and copy not in tile_ids(d))
    shown = tile_ids(driver)
    assert shown[0] == ids["2024/eiffel.jpg"]
    first_page = library.recent(top_k=PAGE)
    folded = library.collapse_duplicates(first_page, gallery.DUPLICATE_COSINE)
    into_first = sum(1 for i in first_page if i != shown[0] and folded[i] == shown[0])
    assert into_first >= 1  # the copy at least
    badge = driver.find_element("css selector", f".tile[data-id='{shown[0]}'] .dups")
    assert badge.text == f"+{into_first}"
    assert "hidden" in driver.find_element("id", "status").text
    snap(driver, shots, "08-duplicates-hidden")


def test_a_phone_gets_three_columns_and_a_stacked_viewer(page, driver, shots) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    page()
    columns = driver.execute_script(
        "return getComputedStyle(document.querySelector('.grid')).gridTemplateColumns.split(' ').length"
    )
    assert 2 <= columns <= 3
    width = driver.execute_script("return document.querySelector('.tile').getBoundingClientRect().width")
    assert 100 < width < 200
    assert driver.execute_script("return document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scroll
    snap(driver, shots, "09-phone")
    driver.find_element("css selector", ".tile").click()
    wait(driver, lambda d: d.execute_script("return document.getElementById('viewer').open"))
    stage, info = driver.execute_script(
        "return ['.stage', 'aside.info'].map(s => document.querySelector(s).getBoundingClientRect().toJSON())"
    )
    assert info["top"] >= stage["bottom"] - 1  # the facts under the photo, not beside it
    snap(driver, shots, "10-phone-viewer")


# The gallery's contract for a video moment (the moments API fills it in): the hit is a video, ``time`` is the
# moment in seconds and ``play`` the file with that moment as a media fragment (``/original/ID#t=S``). Until
# this branch indexes videos, the browser adds such a hit to the timeline's answer, so the page's handling of
# that answer is what is tested here.
INJECT = """
const real = window.fetch;
window.fetch = async (url, options) => {
  const response = await real(url, options);
  if (!String(url).startsWith("/api/timeline") || !String(url).includes("type=video")) return response;
  const body = await response.json();
  body.results = [HIT, ...body.results];
  body.next_cursor = null;
  return new Response(JSON.stringify(body), {status: 200, headers: {"content-type": "application/json"}});
};
"""


def test_a_video_moment_plays_from_its_time(page, driver, library, shots) -> None:
    import json

    poster = library.recent(top_k=1)[0]
    hit = {
        "id": 999_999, "path": "/videos/moment.webm", "name": "moment.webm", "score": None, "type": "video",
        "time": MOMENT, "play": f"/test-media/moment.webm#t={MOMENT}", "thumb": f"/thumb/{poster}",
        "preview": f"/thumb/{poster}?size=512", "original": "/test-media/moment.webm", "taken": "2024-08-04T12:00:00",
        "month": "2024-08", "camera": None, "position": None, "duplicates": 0,
    }  # fmt: skip
    script = driver.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument", {"source": INJECT.replace("HIT", json.dumps(hit))}
    )
    try:
        page("&type=video")
        tile = driver.find_element("css selector", ".tile[data-id='999999']")
        assert tile.find_element("css selector", ".play").text == "0:01"
        tile.click()
        wait(
            driver,
            lambda d: d.execute_script(
                "const v = document.querySelector('#media video'); return v && v.readyState >= 1"
            ),
        )
        played = "const v = document.querySelector('#media video'); return v.played.length && v.played.start(0)"
        wait(driver, lambda d: d.execute_script(played) is not None)
        assert driver.execute_script(played) == pytest.approx(MOMENT, abs=0.15)  # played from the moment on
        wait(
            driver,
            lambda d: d.execute_script("return document.querySelector('#media video').currentTime") > MOMENT + 0.3,
        )
        assert "moment at 0:01" in driver.find_element("id", "v-facts").text
        driver.save_screenshot(str(shots / "11-video-moment.png"))
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})


# -- the API the page stands on ------------------------------------------------------------------------


def test_timeline_api_pages_months_filters_and_duplicates(server, library) -> None:
    ids = ids_by_name(library)
    seen, cursor, first = [], None, None
    while True:
        body = httpx.get(f"{server}/api/timeline", params={"k": 5, **({"cursor": cursor} if cursor else {})}).json()
        first = first or body
        seen += body["results"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert [h["id"] for h in seen] == library.recent(top_k=100)
    taken = [h["taken"] for h in seen]
    assert taken == sorted(taken, reverse=True)  # newest first (all these wall-clock times share a format)
    assert first["months"][:3] == [{"month": "2024-08", "count": 3}, {"month": "2024-07", "count": 2},
                                   {"month": "2024-06", "count": 2}]  # fmt: skip
    assert all(h["month"] == h["taken"][:7] and h["score"] is None for h in seen)
    canon = httpx.get(f"{server}/api/timeline", params={"camera": "canon", "before": "2024-07-31"}).json()
    assert [h["name"] for h in canon["results"]] == ["market.jpg", "garden.jpg"]
    assert canon["months"] == [{"month": "2024-07", "count": 1}, {"month": "2024-06", "count": 1}]
    folded = httpx.get(f"{server}/api/timeline", params={"dedupe": "true"}).json()
    assert ids["copies/eiffel.jpg"] not in [h["id"] for h in folded["results"]]
    assert folded["hidden"] == sum(h["duplicates"] for h in folded["results"]) >= 1
    assert folded["results"][0]["id"] == ids["2024/eiffel.jpg"] and folded["results"][0]["duplicates"] >= 1
    # A cursor belongs to the view it came from.
    r = httpx.get(f"{server}/api/search", params={"q": "a photo", "cursor": first["next_cursor"]})
    assert r.status_code == 400 and "another search" in r.text
