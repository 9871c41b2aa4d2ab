"""Take the screenshots the docs show (docs/screenshots/*.png): the web page's search, locate and
error screens over the demo's index, and a page of this site.

    make demo && .venv/bin/python docs/take_screenshots.py

Needs the ``playwright`` package (the ``dev`` extra) and Debian's ``chromium``
(``apt-get install -y chromium``); nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "screenshots"
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def several_products(catalog: Path, into: Path) -> Path:
    """A 2x2 'basket' of four sample products from four categories, as shop photos."""
    from catalens.datasets.sample import shop_photo

    picks = {}
    for path in sorted((catalog / "images").rglob("*.jpg")):
        picks.setdefault(path.parent, path)
    chosen = list(picks.values())[:4]
    canvas = Image.new("RGB", (700, 700), (235, 232, 225))
    for position, path in enumerate(chosen):
        cell = shop_photo(Image.open(path).convert("RGB"), seed=position).resize((330, 330))
        canvas.paste(cell, (15 + 345 * (position % 2), 15 + 345 * (position // 2)))
    canvas.save(into / "basket.jpg", quality=92)
    return into / "basket.jpg"


def start_server(index: Path, port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "catalens", "serve", "--index", str(index), "--port", str(port),
                                "--read-only"], stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return process
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start") from None
            time.sleep(0.3)


def page_screens(page, url: str, photo: Path, basket: Path, scratch: Path) -> None:
    settled = "!['—', '…'].includes(document.getElementById('classify').textContent)"
    page.goto(url)
    page.wait_for_function("document.getElementById('mode').options.length > 0")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#grid .hit")
    page.wait_for_function(settled, timeout=60_000)
    page.wait_for_function("[...document.querySelectorAll('#grid .hit img')].every(i => i.complete)")
    page.screenshot(path=str(OUT / "page-search.png"))

    page.set_input_files("#file", str(basket))
    page.wait_for_selector("#grid .hit")
    page.click("#locate")
    page.wait_for_selector(".box-label", timeout=120_000)
    page.screenshot(path=str(OUT / "page-locate.png"))

    page.click("#back")
    not_a_photo = scratch / "price-list.jpg"
    not_a_photo.write_text("this is a price list, not a photo\n")
    page.set_input_files("#file", str(not_a_photo))
    page.wait_for_function("document.getElementById('status').className === 'error'", timeout=60_000)
    page.wait_for_function(settled.replace("!['—', '…']", "!['…']"), timeout=60_000)
    page.screenshot(path=str(OUT / "page-error.png"))


def site_screen(page, scratch: Path) -> None:
    site = scratch / "site"
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--no-strict", "--site-dir", str(site)], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    port = free_port()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://127.0.0.1:{port}/python-api/")
        page.wait_for_selector("h1")
        page.screenshot(path=str(OUT / "docs-site.png"))
    finally:
        server.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "demo-index", help="what catalens demo wrote")
    args = parser.parse_args()
    index, photo = args.workdir / "index", args.workdir / "query-shop-photo.jpg"
    if not (index / "catalens.json").is_file():
        raise SystemExit(f"{index}: no index; run 'make demo' first")
    chromium = os.environ.get("CATALENS_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        raise SystemExit("needs Debian's chromium: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="catalens-shots-") as scratch:
        scratch = Path(scratch)
        basket = several_products(args.workdir / "catalog", scratch)
        port = free_port()
        server = start_server(index, port, scratch / "server.log")
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=FLAGS)
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page_screens(page, f"http://127.0.0.1:{port}", photo, basket, scratch)
                site_screen(page, scratch)
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    for shot in sorted(OUT.glob("*.png")):
        print(shot.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
