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
from PIL import Image

from browser_helpers import browser
from clipworks.library import Library, make_filters
from clipworks.service import ServiceSettings, create_app, gallery
from conftest import serve_app
from library_helpers import Shot, exif_of, file_ids, make_variants, make_video, write_shots
from raw_helpers import write_dng

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
# Neither the WebM nor the DNG carries a capture date: their file times count, both in May 2024.
VIDEO_TIME, RAW_TIME = 1715947200.0, 1715515200.0  # 2024-05-17 12:00 and 2024-05-12 12:00 UTC
ITEMS = 14  # twelve photos, the DNG, the video (shown once, at its first moment)
PAGE = 5  # the page size the tests ask for (?k=5): three pages of twelve photos
DESKTOP = {"width": 1280, "height": 700, "deviceScaleFactor": 1, "mobile": False}
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": True}
# The video: red, then a hard cut to blue, sampled every 2 s and at the cut (moments 0, 2, 2.5 and 4).
VIDEO_SCENES = [((200, 40, 40), 2.5), ((40, 60, 200), 2.5)]


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
    # A VP8 WebM (what Chromium plays without proprietary codecs) and a camera RAW with its JPEG preview.
    (root / "clips").mkdir()
    make_video(root / "clips" / "walk.webm", VIDEO_SCENES, codec="libvpx")
    os.utime(root / "clips" / "walk.webm", (VIDEO_TIME, VIDEO_TIME))
    (root / "raw").mkdir()
    write_dng(root / "raw" / "harbour.dng", photos[-1], preview=640, make="Sony", model="ILCE-7M4")
    os.utime(root / "raw" / "harbour.dng", (RAW_TIME, RAW_TIME))


@pytest.fixture(scope="module")
def model(vit_bundle):
    import clipworks

    return clipworks.load(vit_bundle)


@pytest.fixture(scope="module")
def library(model, photos, tmp_path_factory) -> Library:
    root = tmp_path_factory.mktemp("browser") / "photos"
    write_library_folder(photos, root)
    lib = Library(root.parent / "lib.db", model, create=True)
    lib.index([root], batch_size=8, video_every=2.0)
    lib.write_tags([(root / "2024" / "market.jpg", [("dog", 0.91)]), (root / "2023" / "logo.png", [("dog", 0.34)])])
    yield lib
    lib.close()


@pytest.fixture(scope="module")
def server(model, library, tmp_path_factory):
    folder = tmp_path_factory.mktemp("svc")
    settings = ServiceSettings(tags=["dog", "cat"], tags_cache_dir=folder / "tags")
    app = create_app(settings, model=model, library=library, routers=[gallery.router])
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
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page renders its tiles anew: an element a condition found may be replaced before it is read.
    return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(condition)


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


def root_of(library: Library) -> Path:
    return Path(library.path).parent / "photos"


def ids_by_name(library: Library) -> dict[str, int]:
    return {str(Path(p).relative_to(root_of(library))): i for p, i in file_ids(library.path).items()}


def timeline(library: Library, **filters: str) -> list[int]:
    """The library's whole timeline under ``filters`` as the tiles carry it: file ids (a video's, not its
    first moment's search key)."""
    from clipworks.library.store import files_of

    keys = library.recent(top_k=100, filters=make_filters(**filters) if filters else None)
    return [int(i) for i in files_of(keys)]


def hit_ids(library: Library, hits: list) -> list[int]:  # type: ignore[type-arg]
    """The file ids of library hits (a video's moments name the video), as the tiles carry them."""
    ids = ids_by_name(library)
    return [ids[str(Path(h.path).relative_to(root_of(library)))] for h in hits]


def test_timeline_opens_on_the_newest_photos_grouped_by_month(page, library, shots) -> None:
    driver = page()
    everything = timeline(library)
    assert len(everything) == ITEMS
    wait(
        driver,
        lambda d: not d.execute_script("return document.querySelector('#more .spinner')") or len(tile_ids(d)) > PAGE,
    )
    shown = tile_ids(driver)
    assert shown == everything[: len(shown)] and PAGE <= len(shown) < ITEMS  # pages enough to fill the screen
    headings = driver.execute_script("return [...document.querySelectorAll('.month h2')].map(h => h.textContent)")
    assert headings[:2] == ["August 20243 items", "July 20242 items"]
    assert driver.find_element("id", "title").text == "Photos"
    assert f"{ITEMS} items" in driver.find_element("id", "status").text
    snap(driver, shots, "01-timeline")


def test_infinite_scroll_loads_every_page_once(page, library, shots) -> None:
    driver = page()
    before = len(tile_ids(driver))
    assert before < ITEMS
    for _ in range(4):
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        wait(driver, lambda d, n=before: len(tile_ids(d)) > n or "That is all" in d.find_element("id", "more").text)
        before = len(tile_ids(driver))
    wait(driver, lambda d: "That is all" in d.find_element("id", "more").text)
    assert tile_ids(driver) == timeline(library)
    months = driver.execute_script("return [...document.querySelectorAll('.month')].map(m => m.dataset.month)")
    # A month split by a page is one.
    assert months == ["2024-08", "2024-07", "2024-06", "2024-05", "2023-12", "2023-11"]
    snap(driver, shots, "02-timeline-scrolled")


def set_field(driver, name: str, value: str) -> None:  # type: ignore[no-untyped-def]
    """A filter control set as a person would leave it (typed, picked or cleared), then its change event."""
    field = driver.find_element("css selector", f"#filter-form [name={name}]")
    if field.tag_name == "input" and field.get_attribute("type") not in ("date",):
        field.clear()
        if value:
            field.send_keys(value)
    else:  # a date picker or a select: its value as the picker would set it
        driver.execute_script("arguments[0].value = arguments[1]", field, value)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change', {bubbles: true}))", field)


def shown_everything(driver, want: list[int]) -> bool:  # type: ignore[no-untyped-def]
    """Whether the grid holds exactly ``want``, scrolling on until the last page is in (no spinner below)."""
    if tile_ids(driver) == want and not driver.find_elements("css selector", "#more .spinner"):
        return True
    driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    return False


def click_chip(driver, name: str) -> None:  # type: ignore[no-untyped-def]
    """Remove a filter by its chip, as a person does: scrolled back up to it, not clicked through the bar."""
    chip = driver.find_element("css selector", f"#active .chip[data-filter={name}]")
    driver.execute_script("window.scrollTo(0, 0)")
    chip.click()


def test_each_filter_narrows_the_timeline(page, library, shots) -> None:
    driver = page()
    driver.find_element("id", "filters-button").click()
    photos = root_of(library)
    steps = [  # (control, what is entered, the URL parameter, the chip, the same filter through the API)
        ("after", "2024-07-01", "after=2024-07-01", "after 2024-07-01", {"after": "2024-07-01"}),
        ("before", "2023-12-15", "before=2023-12-15", "before 2023-12-15", {"before": "2023-12-15"}),
        ("camera", "iphone", "camera=iphone", "camera iphone", {"camera": "iphone"}),
        ("folder", str(photos / "2023"), "folder=", "in 2023", {"folder": str(photos / "2023")}),
        ("near", "48.8566, 2.3522, 10", "near=", "near 48.8566,2.3522,10", {"near": "48.8566, 2.3522, 10"}),
        ("type", "video", "type=video", "Videos only", {"kind": "video"}),
        ("type", "photo", "type=photo", "Photos only", {"kind": "photo"}),
        ("tag", "dog", "tag=dog", "tag dog", {"tag": "dog"}),
    ]
    everything = timeline(library)
    for n, (name, value, param, chip, api) in enumerate(steps):
        want = timeline(library, **api)
        assert 0 < len(want) < ITEMS, name  # the step narrows, and leaves something to see
        set_field(driver, name, value)
        wait(driver, lambda d, w=want: shown_everything(d, w))
        assert param in driver.current_url
        assert driver.find_element("id", "filter-count").text == "1"
        assert [c.text for c in driver.find_elements("css selector", "#active .chip")] == [chip]
        snap(driver, shots, f"03-filter-{n}-{name}")
        if name == "tag":  # the stored tags, with their scores, in the viewer too
            first = driver.find_element("css selector", ".tile")
            # The panel folds away first. The tag field loses focus, and its own change event must not reload
            # the grid it already shows: the tile found before the click is still the one on the page.
            driver.find_element("id", "filters-button").click()
            first.click()
            wait(driver, lambda d: d.find_element("id", "v-name").text == "market.jpg")
            (shown_tag,) = driver.find_elements("css selector", "#v-tags button")
            assert shown_tag.text.startswith("dog") and shown_tag.find_element("css selector", ".pct").text == "91%"
            driver.find_element("id", "close").click()
            wait(driver, lambda d: not d.execute_script("return document.getElementById('viewer').open"))
            driver.find_element("id", "filters-button").click()
        set_field(driver, name, "")
        wait(driver, lambda d: tile_ids(d)[:PAGE] == everything[:PAGE])

    # Two at once, and a chip removes its own.
    set_field(driver, "camera", "canon")
    set_field(driver, "before", "2024-07-31")
    both = timeline(library, camera="canon", before="2024-07-31")
    wait(driver, lambda d: shown_everything(d, both))
    assert both and driver.find_element("id", "filter-count").text == "2"
    click_chip(driver, "before")
    canon = timeline(library, camera="canon")
    wait(driver, lambda d: shown_everything(d, canon))
    click_chip(driver, "camera")
    wait(driver, lambda d: tile_ids(d)[:PAGE] == everything[:PAGE])

    # The order of matches: a search, best match first, then its pages newest first.
    from selenium.webdriver.common.keys import Keys

    driver.find_element("id", "q").send_keys("a photo", Keys.ENTER)
    by_score = hit_ids(library, library.search("a photo", top_k=PAGE))
    wait(driver, lambda d: tile_ids(d)[:PAGE] == by_score)
    set_field(driver, "sort", "date")
    by_date = hit_ids(library, library.search("a photo", top_k=PAGE, sort="date"))
    assert by_date != by_score and sorted(by_date) == sorted(by_score)  # the same matches, another order
    wait(driver, lambda d: tile_ids(d)[:PAGE] == by_date)
    assert "sort=date" in driver.current_url
    assert [c.text for c in driver.find_elements("css selector", "#active .chip")] == ["Newest first"]
    snap(driver, shots, "03-filter-sorted")


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
    # The dialog first gives focus back to the tile that opened it; the close event, a task later, moves it on
    # to the photo last seen. Reading it at once would race that event.
    last_seen = str(ids["2024/shrine.jpg"])
    wait(driver, lambda d: d.switch_to.active_element.get_attribute("data-id") == last_seen)


def test_similar_photos_from_the_viewer(page, library, shots) -> None:
    driver = page()
    ids = ids_by_name(library)
    driver.find_elements("css selector", ".tile")[2].click()
    wait(driver, lambda d: d.find_element("id", "v-name").text == "seine.jpg")
    driver.find_element("id", "v-similar").click()
    wait(driver, lambda d: d.current_url.endswith(f"id={ids['2024/seine.jpg']}&k={PAGE}"))
    want = hit_ids(library, library.search(images=[root_of(library) / "2024" / "seine.jpg"], top_k=PAGE))
    wait(driver, lambda d: tile_ids(d)[:PAGE] == want)
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
    want = hit_ids(library, library.search("a photo of a dog", top_k=PAGE))
    wait(driver, lambda d: tile_ids(d)[:PAGE] == want)
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


def minutes(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def test_a_video_moment_plays_from_its_time(page, driver, library, shots) -> None:
    videos = make_filters(kind="video")
    # A query whose best video moment lies inside the video, so that playing from 0 would not pass.
    query, best = next(
        (q, hits[0])
        for q in ("a photo of a dog", "a red car", "the sea", "a blue wall", "a crowd", "a painting")
        if (hits := library.search(q, top_k=1, filters=videos)) and hits[0].time > 1.0
    )
    assert best.path.endswith("walk.webm")
    ids = ids_by_name(library)
    page(f"&type=video&q={query.replace(' ', '+')}")
    tile = driver.find_element("css selector", ".tile")
    assert int(tile.get_attribute("data-id")) == ids["clips/walk.webm"]
    assert tile.find_element("css selector", ".play").text == minutes(best.time)
    tile.click()
    video = "document.querySelector('#media video')"
    wait(driver, lambda d: d.execute_script(f"const v = {video}; return v && v.readyState >= 1"))
    source = driver.execute_script(f"return {video}.src")
    assert source.endswith(f"/original/{ids['clips/walk.webm']}#t={best.time:.3f}")
    played = f"const v = {video}; return v.played.length && v.played.start(0)"
    wait(driver, lambda d: d.execute_script(played) is not None)
    assert driver.execute_script(played) == pytest.approx(best.time, abs=0.15)  # played from the moment on
    wait(driver, lambda d: d.execute_script(f"return {video}.currentTime") > best.time + 0.3)
    assert f"moment at {minutes(best.time)}" in driver.find_element("id", "v-facts").text
    driver.save_screenshot(str(shots / "11-video-moment.png"))


def test_a_raw_shows_its_preview_and_downloads_the_original(page, driver, library, server, shots) -> None:
    ids = ids_by_name(library)
    raw = ids["raw/harbour.dng"]
    driver = page("&camera=sony")
    assert tile_ids(driver) == [raw]
    wait(driver, images_loaded)  # the thumbnail is the RAW's preview, decoded through LibRaw
    driver.find_element("css selector", ".tile").click()
    wait(driver, lambda d: d.find_element("id", "v-name").text == "harbour.dng")
    assert "Sony ILCE-7M4" in driver.find_element("id", "v-facts").text
    link = driver.find_element("id", "v-original")
    assert link.text == "Download RAW" and link.get_attribute("download") is not None
    snap(driver, shots, "12-raw")
    r = httpx.get(f"{server}/original/{raw}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/x-adobe-dng"
    assert r.headers["content-disposition"] == "attachment; filename*=utf-8''harbour.dng"
    assert r.content == (root_of(library) / "raw" / "harbour.dng").read_bytes()
    with Image.open(io.BytesIO(httpx.get(f"{server}/thumb/{raw}?size=512").content)) as preview:
        assert preview.format == "JPEG" and max(preview.size) == 512  # from the 640 px preview, not the sensor


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
    assert [h["id"] for h in seen] == timeline(library)
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
