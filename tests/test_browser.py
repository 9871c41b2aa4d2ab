"""The web page and the API documentation in headless Chromium, offline (every request to another
host is refused): pick a photo, see the result grid, open a result; /docs and /redoc render.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and the ``playwright`` Python
package (its own browsers are not needed). Skips without them, except under ``CI=true``.
Screenshots land in ``artifacts/browser/`` for a person to look at.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "browser"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


def _chromium() -> str:
    found = os.environ.get("CATALENS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        found, missing = None, "the playwright Python package"
    else:
        missing = "Debian's chromium (apt-get install -y chromium)"
    if not found:
        reason = f"browser test needs {missing}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _offline(context, url: str) -> list[str]:
    """Refuse every request that does not go to ``url``'s server, as on a machine without internet;
    returns the list of refused URLs."""
    refused: list[str] = []

    def route(request_route) -> None:
        if request_route.request.url.startswith(url):
            request_route.continue_()
        else:
            refused.append(request_route.request.url)
            request_route.abort()

    context.route("**/*", route)
    return refused


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def chromium() -> str:
    return _chromium()


@pytest.fixture(scope="module")
def server(chromium, grocery_catalog, val_photos, tmp_path_factory):
    """A real uvicorn server on 127.0.0.1 over a small index, and a val photo of an indexed class."""
    import subprocess
    import sys
    import urllib.request

    from tests.test_api import build_small_index

    index_dir, items = build_small_index(grocery_catalog, tmp_path_factory.mktemp("browser"), classes=3)
    categories = {item.category for item in items}
    query = next(photo for photo in val_photos if photo.category in categories)
    port = _free_port()
    # A server process of its own, as a user runs it: the network and OpenCV then never share a
    # process with playwright's greenlets (a native crash there took the whole test run down).
    log_path = index_dir.parent / "server.log"
    log_file = open(log_path, "wb")  # a file, not a pipe: nobody reads the pipe, and a full one blocks the server
    process = subprocess.Popen(
        [sys.executable, "-m", "catalens.api.cli", "serve", "--index", str(index_dir), "--port", str(port), "--read-only"],
        cwd=Path(__file__).resolve().parents[1], stdout=log_file, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, f"server exited: {log_path.read_text(errors='replace')[-2000:]}"
        assert time.monotonic() < deadline, "server did not start"
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            break
        except OSError:
            time.sleep(0.2)
    yield url, query
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    log_file.close()


def test_page_uploads_a_photo_and_shows_the_result_grid(chromium, server):
    from playwright.sync_api import sync_playwright

    url, query = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page_errors: list[str] = []
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="catalens-chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            refused = _offline(context, url)
            page = context.new_page()
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('stats').textContent.includes('items')", timeout=30_000)
            assert "30 items in 3 categories" in page.inner_text("#stats")
            modes = page.eval_on_selector_all("#mode option", "options => options.map(o => o.value)")
            # The page offers exactly what the index answers (no 'ae' before train-ae).
            assert modes == page.evaluate("fetch('/stats').then(r => r.json()).then(s => s.modes)")
            assert "deep" in modes and "ae" not in modes

            page.set_input_files("#file", str(query.path))
            page.wait_for_selector("#grid .hit", timeout=60_000)
            page.wait_for_function("document.querySelectorAll('#grid .hit').length === 12", timeout=60_000)
            # Every thumbnail really loaded (the image URLs in the results work).
            page.wait_for_function(
                "[...document.querySelectorAll('#grid .hit img')].every(img => img.complete && img.naturalWidth > 0)",
                timeout=60_000,
            )
            cards = page.query_selector_all("#grid .hit")
            first_category = cards[0].query_selector(".category").inner_text()
            assert first_category == query.category
            scores = [float(card.query_selector(".score").inner_text()) for card in cards]
            assert scores == sorted(scores, reverse=True) and scores[0] > 0  # fused scores may exceed 1
            assert "results in" in page.inner_text("#status")
            # Calibrated confidences on the cards, and the verdict: the top result or "no confident match".
            confidences = [card.query_selector(".confidence").inner_text() for card in cards]
            assert all(text.endswith("%") for text in confidences), confidences
            labels = cards[0].query_selector("dl").inner_text()
            assert "confidence" in labels and "score" in labels, labels  # labelled, not "#2 43% · 1.222"
            verdict = page.inner_text("#match")
            assert verdict.startswith(cards[0].query_selector(".title").inner_text()) or \
                verdict.startswith("no confident match"), verdict
            classify = page.evaluate("fetch('/stats').then(r => r.json()).then(s => s.features.classify)")
            if classify:
                page.wait_for_function("!['—', '…'].includes(document.getElementById('classify').textContent)", timeout=60_000)
                # The best guess at the leaf first, then how deep it is sure, each level with its confidence.
                proposed = page.inner_text("#classify")
                assert proposed.split(":")[0].split("/")[0] == query.category.split("/")[0], proposed
                assert "%" in proposed and "sure" in proposed, proposed
            shot = ARTIFACTS / "search.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")

            # Several products in one photo: the boxes drawn over the photo, each listed with its confidence.
            page.click("#locate")
            page.wait_for_selector("#located:not([hidden])", timeout=60_000)
            page.wait_for_function("document.querySelectorAll('#boxes rect').length > 0", timeout=60_000)
            found = page.inner_text("#located-list")
            assert "confidence" in found and "products found in" in page.inner_text("#status"), found
            # On a screen of its own, with labels at the page's font size.
            assert page.is_hidden("#grid") and page.is_hidden("#verdicts"), "locate shares the screen with the search"
            size = page.eval_on_selector(".box-label", "label => parseFloat(getComputedStyle(label).fontSize)")
            assert size >= 13, size
            shot = ARTIFACTS / "locate.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            page.click("#back")
            page.wait_for_selector("#grid:not([hidden])")

            cards[0].click()
            page.wait_for_selector("#detail[open]")
            mode = page.input_value("#mode")
            if mode in ("local", "fused"):
                page.wait_for_function(
                    "!document.getElementById('detail-note').textContent.includes('drawing')", timeout=60_000
                )
            page.wait_for_function("document.getElementById('detail-image').naturalWidth > 0", timeout=30_000)
            shot = ARTIFACTS / "result-detail.png"
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot} (mode {mode}: {page.inner_text('#detail-note')})")
        finally:
            context.close()
    assert not page_errors, page_errors
    assert not refused, refused


def test_page_clears_the_last_verdicts_and_shows_an_error_once(chromium, server, tmp_path):
    """A file that is not a photo after a good one: one error, on the status line, and no verdict of
    the photo before left beside it."""
    from playwright.sync_api import sync_playwright

    url, query = server
    not_a_photo = tmp_path / "price-list.jpg"
    not_a_photo.write_text("a price list, not a photo\n")
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="catalens-chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 1000})
        try:
            _offline(context, url)
            page = context.new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('mode').options.length > 0", timeout=30_000)
            page.set_input_files("#file", str(query.path))
            page.wait_for_selector("#grid .hit", timeout=60_000)
            page.wait_for_function("document.getElementById('match').textContent !== '…'", timeout=60_000)
            page.set_input_files("#file", str(not_a_photo))
            page.wait_for_function("document.getElementById('status').className === 'error'", timeout=60_000)
            page.wait_for_function("!document.body.innerText.includes('…')", timeout=60_000)
            status = page.inner_text("#status")
            assert page.inner_text("#match") == "—" and not page.query_selector_all("#grid .hit"), status
            assert page.inner_text("#classify") in ("—", "not available on this server")
            reason = status.split(": ", 1)[1]
            assert page.inner_text("body").count(reason) == 1, page.inner_text("body")
        finally:
            context.close()


def test_api_docs_render_offline(chromium, server):
    """Swagger UI and ReDoc come from the server itself: with every other host refused they still render."""
    from playwright.sync_api import sync_playwright

    url, _ = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="catalens-chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            refused = _offline(context, url)
            page = context.new_page()
            page.goto(url + "/docs")
            page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
            operations = page.eval_on_selector_all(".opblock-summary-path", "paths => paths.map(p => p.textContent)")
            assert {"/search", "/classify", "/anomaly", "/items"} <= {path.replace("\u200b", "") for path in operations}
            assert page.is_visible(".btn.authorize")  # the X-API-Key security scheme
            shot = ARTIFACTS / "docs.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")

            page.goto(url + "/redoc")
            page.wait_for_selector("h1", timeout=30_000)
            assert "catalens" in page.inner_text("h1")
            page.wait_for_function("document.body.innerText.includes('/search')", timeout=30_000)
            shot = ARTIFACTS / "redoc.png"
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
        finally:
            context.close()
    # Nothing the pages need lives elsewhere (a CDN would have been refused and left them blank).
    assert not [address for address in refused if address.endswith((".js", ".css"))], refused
