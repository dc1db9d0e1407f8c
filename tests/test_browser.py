"""The upload page in a real browser (headless Debian chromium through Playwright), against the real
scoring server of the tiny pipeline: drop or choose a photo, submit, see the label and similar images.
With ../shared present, also against the real-photo model (ImageNet's MobileNetV2, head=imagenet,
epochs=0) on the real AFHQ sample: a photo of something else gets the unfamiliar note, a real cat
does not."""

from __future__ import annotations

import base64
import contextlib
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from databases import catalogue
from tests.conftest import ROOT, SHARED_SAMPLE, free_port
from web.app import create_app

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "tests" / "artifacts"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
UNFAMILIAR_NOTE = "This photo is unlike the images the model was trained on — its answer is a guess."
SHARED_WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_v2_1.0_224_imagenet.weights.h5"
OTHER_THINGS = ROOT.parent / "shared" / "data" / "not-animal-faces"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make install-test)")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is missing (make browser)", allow_module_level=True)

# Every image shown (similar ones, the uploaded one, the logo) has arrived and decoded: no broken-image
# icon. The hidden preview of the "try another" form has no image yet.
ALL_LOADED = """() => [...document.querySelectorAll('img:not([hidden])')].map(img => ({
    src: img.currentSrc.slice(0, 40), ok: img.complete && img.naturalWidth > 0 }))"""


@contextlib.contextmanager
def flask_page(scoring_url: str, db: Path, image_store: Path):
    """The Flask app on a real HTTP server in a background thread; yields its base URL."""
    from werkzeug.serving import make_server

    app = create_app({"SCORING_URL": f"{scoring_url}/invocations", "ANIMAL_DB": str(db), "IMAGE_STORE": str(image_store)})
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def page_url(pipeline, scoring_server):
    """The page against the real scoring server of the tiny pipeline."""
    with flask_page(scoring_server, pipeline.db, pipeline.image_store) as url:
        yield url


def served_answers(scoring_url: str, paths: list[Path]) -> list[dict]:
    """The served model's own rows for these files (no similar images): what the page will be told."""
    import requests

    rows = [[base64.b64encode(p.read_bytes()).decode()] for p in paths]
    body = {"dataframe_split": {"columns": ["image"], "data": rows}, "params": {"k": 0}}
    return requests.post(f"{scoring_url}/invocations", json=body, timeout=120).json()["predictions"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def photo(pipeline, scoring_server, tmp_path_factory) -> Path:
    """The validation image the served model finds most familiar, under a plain file name, as a person
    would pick it: the page must then show its label with no unfamiliar note."""
    conn = catalogue.connect(pipeline.db, readonly=True)
    try:
        files = [Path(f) for f in catalogue.images(conn, split="val").file]
    finally:
        conn.close()
    rows = served_answers(scoring_server, files)
    best = max(range(len(rows)), key=lambda i: rows[i]["familiarity"])
    assert rows[best]["unfamiliar"] is False, rows[best]
    return Path(shutil.copy(files[best], tmp_path_factory.mktemp("upload") / "my-animal.jpg"))


def open_page(browser, url: str, viewport: dict, **options):
    """A fresh page that records every console error and uncaught exception (CSP violations included)."""
    page = browser.new_page(viewport=viewport, **options)
    page.problems = []
    page.on("console", lambda message: message.type == "error" and page.problems.append(message.text))
    page.on("pageerror", lambda error: page.problems.append(str(error)))
    page.goto(url)
    return page


def check_result(page) -> str:
    """The result page shows a label and every image has loaded; returns the label."""
    page.wait_for_load_state("load")  # the load event waits for every <img>
    label = page.locator("[data-label]").inner_text().strip().lower()
    assert label in {"cat", "dog", "wild"}
    assert page.locator(".probabilities li").count() == 3
    tiles = page.locator(".grid .tile img")
    assert tiles.count() > 0
    assert all(src.startswith("/images/") for src in tiles.evaluate_all("imgs => imgs.map(i => i.getAttribute('src'))"))
    images = page.evaluate(ALL_LOADED)
    assert len(images) == tiles.count() + 2  # the similar ones, the uploaded photo, the logo
    assert all(image["ok"] for image in images), images
    assert page.problems == []
    return label


def upload(browser, url: str, path: Path):
    """A fresh desktop page, `path` chosen and submitted; returns the result page, loaded."""
    page = open_page(browser, url, DESKTOP)
    page.set_input_files("input[name=image]", str(path))
    with page.expect_navigation():
        page.click("button[type=submit]")
    page.wait_for_load_state("load")
    return page


def check_unfamiliar(page, row: dict) -> None:
    """The page shows the unfamiliar note and the model's label only as a guess."""
    note = page.locator("[data-unfamiliar]")
    sync_api.expect(note).to_be_visible()
    assert " ".join(note.inner_text().split()) == UNFAMILIAR_NOTE
    assert page.locator("h1[data-label], .label").count() == 0  # no bold, confident label
    guess = page.locator("[data-label]").inner_text().strip().lower()
    assert guess == row["label"] and page.title() == f"A guess: {guess.capitalize()} · Animal faces"
    assert page.problems == []


def test_upload_through_the_page(browser, page_url, photo):
    page = open_page(browser, page_url, DESKTOP)
    assert page.title() == "Animal faces"
    page.set_input_files("input[name=image]", str(photo))
    # The JavaScript previews the chosen file before it is sent.
    sync_api.expect(page.locator("[data-preview]")).to_be_visible()
    assert page.locator("[data-preview]").evaluate("img => img.decode().then(() => img.naturalWidth)") > 0
    assert "my-animal.jpg" in page.locator("[data-hint]").inner_text()
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert page.url == f"{page_url}/predict"
    label = check_result(page)
    assert page.title() == f"{label.capitalize()} · Animal faces"
    assert page.locator("[data-unfamiliar]").count() == 0  # the model finds it familiar: no note
    assert page.locator("[data-uploaded]").get_attribute("src").startswith("data:image/jpeg;base64,")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "browser-result.png", full_page=True)
    page.close()


def test_drag_and_drop_on_a_phone(browser, page_url, photo):
    page = open_page(browser, page_url, PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    # A drop event carrying the file, as the browser makes it when a file is dragged onto the zone.
    transfer = page.evaluate_handle(
        """([name, base64]) => {
            const bytes = Uint8Array.from(atob(base64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: 'image/jpeg'}));
            return transfer;
        }""",
        [photo.name, __import__("base64").b64encode(photo.read_bytes()).decode()],
    )
    page.dispatch_event("[data-drop]", "drop", {"dataTransfer": transfer})
    sync_api.expect(page.locator("[data-preview]")).to_be_visible()
    assert page.locator("[data-preview]").evaluate("img => img.decode().then(() => img.naturalWidth)") > 0
    assert page.evaluate("document.querySelector('input[name=image]').files[0].name") == photo.name
    with page.expect_navigation():
        page.click("button[type=submit]")
    check_result(page)
    # Nothing wider than the phone's screen: no sideways scrolling.
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "browser-result-phone.png", full_page=True)
    page.close()


def test_error_page_in_the_browser(browser, page_url, tmp_path):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a photo at all")
    page = open_page(browser, page_url, DESKTOP)
    page.set_input_files("input[name=image]", str(not_an_image))
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert page.locator("h1").inner_text() == "Bad Request"
    assert "not an image" in page.locator("[data-message]").inner_text()
    page.click("text=Back to the upload page")
    assert page.url == f"{page_url}/"
    page.close()


def test_too_large_file_in_the_browser(browser, page_url, tmp_path):
    big = tmp_path / "huge.jpg"
    big.write_bytes(b"\xff\xd8\xff" + bytes(11 * 1024 * 1024))  # over the 10 MB default
    # With JavaScript the page refuses it before sending anything...
    page = open_page(browser, page_url, DESKTOP)
    posts = []
    page.on("request", lambda request: request.method == "POST" and posts.append(request.url))
    page.set_input_files("input[name=image]", str(big))
    assert "huge.jpg is 11.0 MB: too large" in page.locator("[data-hint]").inner_text()
    page.click("button[type=submit]")
    page.wait_for_timeout(300)  # time enough for a submit to start, if the page let one through
    assert posts == [] and page.url == f"{page_url}/"
    page.close()
    # ...without it the server does (413), and the browser gets the page, not a reset connection.
    context = browser.new_context(java_script_enabled=False, viewport=DESKTOP)
    page = context.new_page()
    page.goto(page_url)
    page.set_input_files("input[name=image]", str(big))
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert page.locator("h1").inner_text() == "Request Entity Too Large"
    assert "uploads are limited to 10 MB" in page.locator("[data-message]").inner_text()
    context.close()


def far_off_images(folder: Path) -> list[Path]:
    """Images unlike any face drawing: flat black, a fine checkerboard, hard stripes."""
    from PIL import Image

    squares = (np.indices((64, 64)).sum(axis=0) // 4 % 2 * 255).astype(np.uint8)
    stripes = (np.indices((64, 64))[1] // 8 % 2 * 255).astype(np.uint8)
    arrays = {"black": np.zeros((64, 64), np.uint8), "checkerboard": squares, "stripes": stripes}
    paths = []
    for name, array in arrays.items():
        paths.append(folder / f"{name}.png")
        Image.fromarray(array).convert("RGB").save(paths[-1])
    return paths


def test_an_unfamiliar_photo_gets_the_note_not_a_label(browser, page_url, scoring_server, pipeline, tmp_path):
    import requests

    candidates = far_off_images(tmp_path)
    rows = served_answers(scoring_server, candidates)
    oddest = min(range(len(rows)), key=lambda i: rows[i]["familiarity"])
    assert rows[oddest]["unfamiliar"] is True, rows  # the served model flags it: now the page must say so

    assert requests.get(f"{page_url}/api/model", timeout=120).ok  # the footer's card, read once
    page = upload(browser, page_url, candidates[oddest])
    check_unfamiliar(page, rows[oddest])
    assert page.locator("[data-model-version]").inner_text() == pipeline.version
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "browser-unfamiliar.png", full_page=True)
    page.close()


@pytest.fixture(scope="module")
def real_photo_page(tmp_path_factory, tracking_store):
    """The real-photo model (shared ImageNet weights, head=imagenet, epochs=0, 224 px) registered from
    the 57-photo AFHQ sample's catalogue, served, and the page against it: (scoring URL, page URL)."""
    if not (SHARED_WEIGHTS.is_file() and SHARED_SAMPLE.is_dir() and OTHER_THINGS.is_dir()):
        pytest.skip("no shared ImageNet weights, AFHQ sample or photos of other things (../shared)")
    from steps.defaults import Hyperparameters
    from steps.extract import extract
    from steps.populate import populate
    from steps.register import register
    from steps.train import train
    from web.serve import scoring_server

    root = tmp_path_factory.mktemp("real-photos")
    image_store, metadata, db = root / "images", root / "metadata.csv", root / "sample.db"
    extract(str(SHARED_SAMPLE), image_store, metadata)
    populate(metadata, image_store, db)
    hp = Hyperparameters(backbone="mobilenet_v2", weights=str(SHARED_WEIGHTS), head="imagenet")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANIMAL_FEATURE_CACHE", str(root / "features"))  # never the checkout's outputs/
        _, _, model_uri = train(db, image_size=224, epochs=0, hp=hp)
    version = register(model_uri, db, name="animal-real-photos").version
    model = f"models:/animal-real-photos/{version}"
    log = root / "serve.log"
    with scoring_server(model, wait=180, tracking_uri=tracking_store, log=log) as served, flask_page(served.url, db, image_store) as url:
        yield served.url, url


def test_the_real_photo_model_notes_a_photo_of_something_else(browser, real_photo_page):
    scoring_url, url = real_photo_page
    # A human face: a face, but not an animal's (the "photo of something else").
    other = OTHER_THINGS / "face.jpg"
    cats = sorted((SHARED_SAMPLE / "val" / "cat").glob("*.jpg"))
    other_row, *cat_rows = served_answers(scoring_url, [other, *cats])
    assert other_row["unfamiliar"] is True, other_row  # the model's own answer first: then the page's
    page = upload(browser, url, other)
    check_unfamiliar(page, other_row)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "browser-real-unfamiliar.png", full_page=True)
    page.close()

    # A real cat the model calls cat and familiar: the label, its similar real photos, no note.
    familiar = [cat for cat, row in zip(cats, cat_rows) if row["label"] == "cat" and row["unfamiliar"] is False]
    assert familiar, cat_rows
    page = upload(browser, url, familiar[0])
    assert check_result(page) == "cat"
    assert page.locator("[data-unfamiliar]").count() == 0
    page.close()
