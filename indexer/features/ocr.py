"""Reading the words printed in a photo: PP-OCRv4 text detection and recognition on OpenVINO.

The models are the ONNX files the ``rapidocr-onnxruntime`` wheel ships (Apache-2.0, ~15 MB).
That wheel is not installed: it requires ``opencv-python``, whose ``cv2`` would shadow the
``opencv-contrib-python-headless`` one SIFT needs, so ``fetch_models`` (run by ``make setup``)
downloads it with ``pip download --no-deps`` and keeps only the two model files. OpenVINO,
which catalens runs its networks on already, reads ONNX itself; the pre- and post-processing
below follow PaddleOCR's (DB box decoding, CTC greedy decoding). The direction classifier is
left out: packs photographed upside down are rare, and it cost a third of the time.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

WHEEL = "rapidocr-onnxruntime==1.4.4"
DETECTOR, RECOGNISER = "ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx"
MODELS_ENV = "CATALENS_OCR_MODELS"


class OcrModelsMissingError(RuntimeError):
    """The OCR models are not on this machine; the message says how to get them."""


def models_dir() -> Path:
    """Where the OCR models are: ``$CATALENS_OCR_MODELS``, else beside the environment catalens runs in."""
    return Path(os.environ.get(MODELS_ENV) or Path(sys.prefix) / "share" / "catalens" / "ocr")


def fetch_models(target: Path | None = None) -> Path:
    """Download the OCR wheel (no dependencies) and keep its two model files in ``target``."""
    target = target or models_dir()
    if all((target / name).is_file() for name in (DETECTOR, RECOGNISER)):
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="catalens-ocr-") as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", folder, WHEEL], check=True)
        [wheel] = Path(folder).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            for name in (DETECTOR, RECOGNISER):
                member = next(m for m in archive.namelist() if m.endswith(f"/models/{name}"))
                (target / name).write_bytes(archive.read(member))
    return target


def onnx_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` (the recogniser keeps its character list there), read from
    the protobuf directly: OpenVINO does not expose them and the ``onnx`` package is not needed."""
    data = path.read_bytes()

    def varint(position: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[position]
            value |= (byte & 0x7F) << shift
            position += 1
            if byte < 0x80:
                return value, position
            shift += 7

    def fields(start: int, end: int):
        position = start
        while position < end:
            tag, position = varint(position)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                _, position = varint(position)
            elif wire == 2:
                length, position = varint(position)
                yield number, position, position + length
                position += length
            elif wire == 1:
                position += 8
            elif wire == 5:
                position += 4
            else:
                raise ValueError(f"{path}: not an ONNX model (wire type {wire})")

    metadata = {}
    for number, start, end in fields(0, len(data)):
        if number == 14:  # ModelProto.metadata_props: StringStringEntryProto {key = 1, value = 2}
            entry = {n: data[s:e].decode("utf-8") for n, s, e in fields(start, end)}
            metadata[entry.get(1, "")] = entry.get(2, "")
    return metadata


@dataclass(frozen=True)
class OcrOptions:
    """How photos are read; ``IndexConfig.feature_options["text"]``."""

    # Longer side of the copy text is detected on, up or down. On ten 348-px grocery packs: 348
    # (as is) 95 ms a photo, 512 145 ms, 736 215 ms and the only one to read APPLE JUICE, YOGHURT,
    # JORDGUBB and SVENSK GARDAR whole (PaddleOCR's own default is 736 on the shorter side).
    detect_side: int = 736
    # A pixel of the probability map is text above this; a box is kept above box_threshold.
    threshold: float = 0.3
    box_threshold: float = 0.5
    unclip_ratio: float = 1.6
    # Words recognised with less confidence are dropped (PaddleOCR's text_score).
    min_confidence: float = 0.5
    max_boxes: int = 50
    threads: int = 1


_MEAN = np.float32(0.5)


class TextReader:
    """Words in a photo, read by PP-OCRv4 on OpenVINO's CPU plugin (one compiled model a process)."""

    def __init__(self, options: OcrOptions | None = None, folder: Path | None = None):
        self.options = options or OcrOptions()
        folder = folder or models_dir()
        missing = [name for name in (DETECTOR, RECOGNISER) if not (folder / name).is_file()]
        if missing:
            raise OcrModelsMissingError(
                f"the OCR models are not in {folder} ({', '.join(missing)} missing): run 'make setup' or "
                f"'python -m catalens.indexer.features.ocr' (it downloads {WHEEL} and keeps its models), or set {MODELS_ENV}")
        self.folder = folder
        characters = onnx_metadata(folder / RECOGNISER).get("character", "").splitlines()
        # CTC: index 0 is the blank, the last the space PaddleOCR appends.
        self.characters = ["", *characters, " "]
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {"options": self.options, "folder": self.folder, "characters": self.characters}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _requests(self):
        """This thread's infer requests (compiled once per process, one request per thread)."""
        requests = getattr(self._local, "requests", None)
        if requests is None:
            from catalens.indexer.features.decode import in_decode_worker
            from catalens.indexer.runtime import openvino_core

            # A forked decode worker gets its own Core: the parent's plugin threads did not survive the fork.
            core = _worker_core() if in_decode_worker() else openvino_core()
            config = {"INFERENCE_NUM_THREADS": self.options.threads, "PERFORMANCE_HINT": "LATENCY"}
            compiled = [core.compile_model(str(self.folder / name), "CPU", config) for name in (DETECTOR, RECOGNISER)]
            requests = self._local.requests = [model.create_infer_request() for model in compiled]
        return requests

    def read(self, image: Image.Image) -> list[tuple[str, float, np.ndarray]]:
        """(text, confidence, 4-point box in the image's pixels) of each line read, top to bottom."""
        bgr = cv2.cvtColor(np.asarray(image.convert("RGB"), np.uint8), cv2.COLOR_RGB2BGR)
        detector, recogniser = self._requests()
        boxes = self._detect(detector, bgr)
        if not boxes:
            return []
        crops = [_crop(bgr, box) for box in boxes]
        texts = self._recognise(recogniser, crops)
        return [(text, score, box) for (text, score), box in zip(texts, boxes, strict=True)
                if text.strip() and score >= self.options.min_confidence]

    def __call__(self, image: Image.Image) -> str:
        """The words read, one line each."""
        return "\n".join(text for text, _, _ in self.read(image))

    def _detect(self, request, bgr: np.ndarray) -> list[np.ndarray]:
        height, width = bgr.shape[:2]
        scale = self.options.detect_side / max(height, width, 1)
        # The network downsamples by 32: sides are multiples of it.
        new_h, new_w = (max(32, int(round(side * scale / 32)) * 32) for side in (height, width))
        resized = cv2.resize(bgr, (new_w, new_h))
        blob = ((resized.astype(np.float32) / 255.0 - _MEAN) / _MEAN).transpose(2, 0, 1)[None]
        probability = _infer(request, blob)[0, 0]
        mask = (probability > self.options.threshold).astype(np.uint8)
        mask = cv2.dilate(mask, np.ones((2, 2), np.uint8))
        contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        boxes = []
        for contour in contours[: 4 * self.options.max_boxes]:
            (cx, cy), (w, h), angle = cv2.minAreaRect(contour)
            if min(w, h) < 3:
                continue
            x, y, bw, bh = cv2.boundingRect(contour)
            region = np.zeros((bh, bw), np.uint8)
            cv2.fillPoly(region, [contour.reshape(-1, 2) - [x, y]], 1)
            if cv2.mean(probability[y : y + bh, x : x + bw], region)[0] < self.options.box_threshold:
                continue
            # DB's unclip: the shrunk text kernel grown back by area * ratio / perimeter on every side.
            grow = w * h * self.options.unclip_ratio / (2 * (w + h))
            (cx, cy), (w, h), angle = (cx, cy), (w + 2 * grow, h + 2 * grow), angle
            if min(w, h) < 5:
                continue
            box = cv2.boxPoints(((cx, cy), (w, h), angle)) * [width / new_w, height / new_h]
            box[:, 0] = np.clip(box[:, 0], 0, width - 1)
            box[:, 1] = np.clip(box[:, 1], 0, height - 1)
            boxes.append(_clockwise(box.astype(np.float32)))
        boxes.sort(key=lambda b: (round(b[:, 1].min() / 10), b[:, 0].min()))
        return boxes[: self.options.max_boxes]

    def _recognise(self, request, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        height, max_width = 48, 320
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        order = np.argsort([crop.shape[1] / max(crop.shape[0], 1) for crop in crops])
        for first in range(0, len(order), 8):
            batch = order[first : first + 8]
            ratio = max(max_width / height, *(crops[i].shape[1] / max(crops[i].shape[0], 1) for i in batch))
            width = int(height * ratio)
            blob = np.zeros((len(batch), 3, height, width), np.float32)
            for row, i in enumerate(batch):
                crop = crops[i]
                resized_w = min(width, int(np.ceil(height * crop.shape[1] / max(crop.shape[0], 1))))
                resized = cv2.resize(crop, (max(1, resized_w), height)).astype(np.float32)
                blob[row, :, :, : resized.shape[1]] = ((resized / 255.0 - _MEAN) / _MEAN).transpose(2, 0, 1)
            probabilities = _infer(request, blob)
            for row, i in enumerate(batch):
                results[i] = self._ctc(probabilities[row])
        return results

    def _ctc(self, probabilities: np.ndarray) -> tuple[str, float]:
        """CTC greedy decoding: best class a step, repeats collapsed, blanks dropped."""
        best = probabilities.argmax(axis=1)
        keep = best != 0
        keep[1:] &= best[1:] != best[:-1]
        if not keep.any():
            return "", 0.0
        confidence = float(probabilities[np.arange(len(best)), best][keep].mean())
        return "".join(self.characters[c] if c < len(self.characters) else "" for c in best[keep]), confidence


_worker_cores: dict[int, object] = {}


def _worker_core():
    import openvino as ov

    return _worker_cores.setdefault(os.getpid(), ov.Core())


def _infer(request, blob: np.ndarray) -> np.ndarray:
    from catalens.indexer.runtime import _alone_if_first

    return _alone_if_first(lambda: request.infer({0: blob})[0])


def _clockwise(box: np.ndarray) -> np.ndarray:
    """Top-left, top-right, bottom-right, bottom-left."""
    by_x = box[np.argsort(box[:, 0])]
    left, right = by_x[:2], by_x[2:]
    top_left, bottom_left = left[np.argsort(left[:, 1])]
    top_right, bottom_right = right[np.argsort(right[:, 1])]
    return np.array([top_left, top_right, bottom_right, bottom_left], np.float32)


def _crop(bgr: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The box straightened to a horizontal strip (a tall one turned: vertical text)."""
    width = int(max(np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[2] - box[3])))
    height = int(max(np.linalg.norm(box[0] - box[3]), np.linalg.norm(box[1] - box[2])))
    width, height = max(width, 1), max(height, 1)
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    strip = cv2.warpPerspective(bgr, cv2.getPerspectiveTransform(box, target), (width, height),
                                borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    return np.rot90(strip) if height / width >= 1.5 else strip


if __name__ == "__main__":
    print(f"OCR models in {fetch_models()}")
