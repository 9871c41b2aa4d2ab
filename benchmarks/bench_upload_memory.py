"""Peak resident memory and CPU of ``catalens serve`` under 8 concurrent worst-case requests
(issues 16 and 35).

Builds a 24-item sample index plus one 5790x5790 RGBA cut-out, starts the server in a subprocess
with 8 worker threads (read-only, 127.0.0.1), and for each kind of hostile request sends
``--concurrency`` of them at once (POST /search of an upload; thumbnails and /explain of the
cut-out) while sampling the server's resident memory every 10 ms. Prints, per kind: the upload's
size, the answers, the peak RSS, the peak over the server's RSS at rest, and the server's CPU
seconds per request (its CPU time over the row, divided by the requests).

    .venv/bin/python benchmarks/bench_upload_memory.py [--concurrency 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from catalens.api.tables import format_table
from catalens.indexer.imageio import (
    MAX_ASPECT_RATIO,
    MAX_JPEG_SCANS,
    QUERY_BUDGET_BYTES,
    QUERY_MAX_DECODE_BYTES,
    jpeg_layout,
)

SIDE = 6300  # 39.7 megapixels: under the 40 MP upload limit


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def encoded(array: np.ndarray, mode: str | None, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format=fmt, **options)
    return buffer.getvalue()


# One 10-byte refinement scan with no data: libjpeg still walks every block of the image.
EMPTY_SCAN = b"\xff\xda\x00\x08\x01\x01\x00\x01\x3f\x10"
CUT_OUT_SIDE = 5790  # the largest RGBA under the 128 MiB decode limit
CUT_OUT_ID = "sku-cut-out"


def cut_out(side: int = CUT_OUT_SIDE) -> Image.Image:
    rgba = np.zeros((side, side, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[::50, :, 0] = 200
    return Image.fromarray(rgba, "RGBA")


def with_empty_scans(data: bytes, scans: int) -> bytes:
    return data[:-2] + EMPTY_SCAN * scans + b"\xff\xd9"


def worst_case_uploads() -> dict[str, tuple[bytes, str]]:
    """Small files that decode to as many bytes as the limits let through (and one just over)."""
    grey16 = np.zeros((SIDE, SIDE), np.uint16)
    grey16[::50] = 40_000
    rgba_side = CUT_OUT_SIDE  # 127.9 MiB decoded at 4 bytes a pixel
    rgba = np.asarray(cut_out())
    over = np.zeros((SIDE, SIDE, 4), np.uint8)
    over[::50, :, 1] = 90
    photo = np.random.default_rng(0).integers(0, 255, (SIDE // 8, SIDE // 8, 3), np.uint8)
    jpeg = np.asarray(Image.fromarray(photo).resize((SIDE, SIDE)))
    noise = np.random.default_rng(1).integers(0, 255, (2600, 2600, 3), np.uint8)  # just under the 20 MiB body limit
    flt = np.zeros((4096, 4096), np.float32)  # 64 MiB decoded
    flt[::30] = 1.0
    grey = np.zeros((6600, 6000), np.uint8)  # issue 35's probe; its coefficients take 76 MiB
    grey[::40] = 200
    progressive_grey = encoded(grey, None, "JPEG", progressive=True)
    grey_scans = jpeg_layout(progressive_grey).scans
    return {
        f"16-bit grey PNG {SIDE}x{SIDE}": (encoded(grey16, None, "PNG"), "image/png"),
        f"RGBA PNG {rgba_side}x{rgba_side}": (encoded(rgba, "RGBA", "PNG"), "image/png"),
        f"RGBA PNG {SIDE}x{SIDE} (over budget)": (encoded(over, "RGBA", "PNG"), "image/png"),
        f"float TIFF {4096}x{4096}": (encoded(flt, "F", "TIFF", compression="tiff_deflate"), "image/tiff"),
        f"JPEG {SIDE}x{SIDE}": (encoded(jpeg, None, "JPEG", quality=70), "image/jpeg"),
        "PNG of noise 2600x2600 (a large body)": (encoded(noise, None, "PNG"), "image/png"),
        "progressive grey JPEG 6000x6600, 3000 empty scans": (with_empty_scans(progressive_grey, 3000), "image/jpeg"),
        f"progressive grey JPEG 6000x6600, {MAX_JPEG_SCANS} scans (the limit)":
            (with_empty_scans(progressive_grey, MAX_JPEG_SCANS - grey_scans), "image/jpeg"),
        f"progressive 4:4:4 JPEG {SIDE}x{SIDE}": (encoded(jpeg, None, "JPEG", quality=70, progressive=True, subsampling=0),
                                                 "image/jpeg"),
        f"progressive 4:2:0 JPEG {SIDE}x{SIDE}": (encoded(jpeg, None, "JPEG", quality=70, progressive=True), "image/jpeg"),
        "strip PNG 6000x1": (encoded(np.full((1, 6000, 3), 90, np.uint8), None, "PNG"), "image/png"),
        "strip PNG 100000x1": (encoded(np.full((1, 100_000, 3), 90, np.uint8), None, "PNG"), "image/png"),
        f"strip PNG {100 * MAX_ASPECT_RATIO}x100 (the widest accepted)":
            (encoded(np.full((100, 100 * MAX_ASPECT_RATIO, 3), 90, np.uint8), None, "PNG"), "image/png"),
    }


@dataclass
class Case:
    """One row: ``route`` is "/search" or "/explain" with ``payload`` (None: a chunked body of
    ``size`` bytes), or "thumbnail" (GET /items/<the cut-out>/image?size=16)."""

    name: str
    size: int
    route: str
    payload: tuple[bytes, str] | None


def chunked(total: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    yield (b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
           b"Content-Type: image/png\r\n\r\n")
    for _ in range(total // chunk):
        yield b"\0" * chunk


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_index(folder: Path) -> Path:
    # `catalens index` as the CLI runs it: then fits what search uses (the classifier, the confidence)
    from catalens.api.service import index as index_catalog
    from catalens.datasets.catalog import CatalogItem, write_manifest
    from catalens.datasets.sample import write_sample_catalog
    from catalens.indexer.config import IndexConfig

    _, items = write_sample_catalog(folder / "catalog")
    image = folder / "catalog" / "cut-out.png"
    cut_out().save(image)
    items.append(CatalogItem(CUT_OUT_ID, image, "Cut-outs", "A 5790 px cut-out", {}))
    index_catalog(write_manifest(items, folder / "catalog" / "catalog.jsonl"), folder / "index", IndexConfig(),
                  progress=False)
    return folder / "index"


def send(url: str, case: Case) -> int:
    """One request of ``case``; its status."""
    with httpx.Client(timeout=600) as client:
        if case.route == "thumbnail":
            return client.get(f"{url}/items/{CUT_OUT_ID}/image", params={"size": 16}).status_code
        if case.payload is None:
            headers = {"content-type": "multipart/form-data; boundary=b"}
            return client.post(f"{url}/search", content=chunked(case.size), headers=headers).status_code
        data, kind = case.payload
        form = {"id": CUT_OUT_ID, "mode": "fused"} if case.route == "/explain" else None
        return client.post(f"{url}{case.route}", files={"image": ("upload", data, kind)}, data=form).status_code


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def burst(url: str, case: Case, concurrency: int, rounds: int, pid: int) -> tuple[Counter[int], float, int]:
    """``rounds`` bursts of ``concurrency`` requests at once: (answers, seconds, peak RSS of ``pid``)."""
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    answers: Counter[int] = Counter()
    for _ in range(rounds):
        with ThreadPoolExecutor(concurrency) as pool:
            answers.update(pool.map(lambda _: send(url, case), range(concurrency)))
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    return answers, seconds, peak[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="bursts of --concurrency uploads per kind")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="catalens-bench-memory-") as tmp:
        index = build_index(Path(tmp))
        uploads = worst_case_uploads()
        cut_out_png = uploads[f"RGBA PNG {CUT_OUT_SIDE}x{CUT_OUT_SIDE}"][0]
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, uvicorn; from catalens.api.http.app import create_app; "
             f"uvicorn.run(create_app(sys.argv[1], read_only=True, workers={args.concurrency}), "
             f"host='127.0.0.1', port={port}, log_level='warning')", str(index)])
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            small = encoded(np.full((256, 256, 3), 120, np.uint8), None, "JPEG")
            httpx.post(f"{url}/search", files={"image": ("warm.jpg", small, "image/jpeg")}, timeout=120)
            time.sleep(0.5)
            at_rest = rss_bytes(server.pid)
            rows = []
            cases = [Case(name, len(data), "/search", (data, kind)) for name, (data, kind) in uploads.items()]
            cases.append(Case("chunked body of 200 MB, no Content-Length", 200 << 20, "/search", None))
            cases.append(Case(f"thumbnail (size=16) of the {CUT_OUT_SIDE}x{CUT_OUT_SIDE} RGBA item", 0, "thumbnail", None))
            cases.append(Case(f"/explain of the {CUT_OUT_SIDE}x{CUT_OUT_SIDE} RGBA item, photo itself", len(cut_out_png),
                              "/explain", (cut_out_png, "image/png")))
            for case in cases:
                cpu_before = cpu_seconds(server.pid)
                answers, seconds, peak = burst(url, case, args.concurrency, args.rounds, server.pid)
                cpu = (cpu_seconds(server.pid) - cpu_before) / (args.concurrency * args.rounds)
                peak = max(peak, at_rest)
                rows.append((case.name, f"{case.size / 1e6:.2f} MB",
                             ", ".join(f"{n}x {code}" for code, n in sorted(answers.items())), f"{seconds:.1f}",
                             f"{cpu:.2f}", f"{peak / 2**20:.0f} MiB", f"+{(peak - at_rest) / 2**20:.0f} MiB"))
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"server RSS at rest: {at_rest / 2**20:.0f} MiB; {args.concurrency} concurrent requests x {args.rounds} rounds "
          f"per row, {args.concurrency} worker threads; decode limit {QUERY_MAX_DECODE_BYTES / 2**20:.0f} MiB a photo, "
          f"{QUERY_BUDGET_BYTES / 2**20:.0f} MiB all together")
    print(format_table(["request", "size", "answers", "seconds", "CPU s / request", "peak RSS", "over rest"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
