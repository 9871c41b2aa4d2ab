"""Peak resident memory of ``catalens serve`` under 8 concurrent worst-case uploads (issue 16).

Builds a 24-item sample index, starts the server in a subprocess with 8 worker threads
(read-only, 127.0.0.1), and for each kind of hostile upload sends ``--concurrency`` of them at
once to POST /search while sampling the server's resident memory every 10 ms. Prints, per
kind: the upload's size, the answers, the peak RSS and the peak over the server's RSS at rest.

    .venv/bin/python benchmarks/bench_upload_memory.py [--concurrency 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from catalens.api.tables import format_table

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


def worst_case_uploads() -> dict[str, tuple[bytes, str]]:
    """Small files that decode to as many bytes as the limits let through (and one just over)."""
    grey16 = np.zeros((SIDE, SIDE), np.uint16)
    grey16[::50] = 40_000
    rgba_side = 5790  # 127.9 MiB decoded at 4 bytes a pixel: the largest RGBA under the 128 MiB budget
    rgba = np.zeros((rgba_side, rgba_side, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[::50, :, 0] = 200
    over = np.zeros((SIDE, SIDE, 4), np.uint8)
    over[::50, :, 1] = 90
    photo = np.random.default_rng(0).integers(0, 255, (SIDE // 8, SIDE // 8, 3), np.uint8)
    jpeg = np.asarray(Image.fromarray(photo).resize((SIDE, SIDE)))
    noise = np.random.default_rng(1).integers(0, 255, (2600, 2600, 3), np.uint8)  # just under the 20 MiB body limit
    flt = np.zeros((4096, 4096), np.float32)  # 64 MiB decoded
    flt[::30] = 1.0
    return {
        f"16-bit grey PNG {SIDE}x{SIDE}": (encoded(grey16, None, "PNG"), "image/png"),
        f"RGBA PNG {rgba_side}x{rgba_side}": (encoded(rgba, "RGBA", "PNG"), "image/png"),
        f"RGBA PNG {SIDE}x{SIDE} (over budget)": (encoded(over, "RGBA", "PNG"), "image/png"),
        f"float TIFF {4096}x{4096}": (encoded(flt, "F", "TIFF", compression="tiff_deflate"), "image/tiff"),
        f"JPEG {SIDE}x{SIDE}": (encoded(jpeg, None, "JPEG", quality=70), "image/jpeg"),
        "PNG of noise 2600x2600 (a large body)": (encoded(noise, None, "PNG"), "image/png"),
    }


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
    from catalens.datasets.sample import write_sample_catalog
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog

    manifest, _ = write_sample_catalog(folder / "catalog")
    index_catalog(manifest, folder / "index", IndexConfig(), progress=False)
    return folder / "index"


def send(url: str, payload: tuple[bytes, str] | None, size: int) -> int:
    """One POST /search of ``payload`` (a chunked body of ``size`` bytes when None); its status."""
    with httpx.Client(timeout=600) as client:
        if payload is None:
            headers = {"content-type": "multipart/form-data; boundary=b"}
            return client.post(f"{url}/search", content=chunked(size), headers=headers).status_code
        data, kind = payload
        return client.post(f"{url}/search", files={"image": ("upload", data, kind)}).status_code


def burst(url: str, payload: tuple[bytes, str] | None, size: int, concurrency: int, rounds: int,
          pid: int) -> tuple[Counter[int], float, int]:
    """``rounds`` bursts of ``concurrency`` uploads at once: (answers, seconds, peak RSS of ``pid``)."""
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
            answers.update(pool.map(lambda _: send(url, payload, size), range(concurrency)))
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
            cases: list[tuple[str, int, object]] = [(name, len(data), (data, kind)) for name, (data, kind) in uploads.items()]
            cases.append(("chunked body of 200 MB, no Content-Length", 200 << 20, None))
            for name, size, payload in cases:
                answers, seconds, peak = burst(url, payload, size, args.concurrency, args.rounds, server.pid)
                peak = max(peak, at_rest)
                rows.append((name, f"{size / 1e6:.2f} MB", ", ".join(f"{n}x {code}" for code, n in sorted(answers.items())),
                             f"{seconds:.1f}", f"{peak / 2**20:.0f} MiB", f"+{(peak - at_rest) / 2**20:.0f} MiB"))
        finally:
            server.terminate()
            server.wait(timeout=30)
    from catalens.indexer.imageio import QUERY_BUDGET_BYTES, QUERY_MAX_DECODE_BYTES

    print(f"server RSS at rest: {at_rest / 2**20:.0f} MiB; {args.concurrency} concurrent uploads x {args.rounds} rounds "
          f"per row, {args.concurrency} worker threads; decode limit {QUERY_MAX_DECODE_BYTES / 2**20:.0f} MiB a photo, "
          f"{QUERY_BUDGET_BYTES / 2**20:.0f} MiB all together")
    print(format_table(["upload", "size", "answers", "seconds", "peak RSS", "over rest"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
