"""Detections drawn over their photo: labelled boxes, for ``locate --draw`` and the benchmark."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps

from catalens.search.locate.results import Detection, LocateResult


def draw_detections(image: Image.Image, detections: Sequence[Detection]) -> Image.Image:
    """A copy of ``image`` with each detection's box and label (rank, title, confidence or else score)."""
    from PIL import ImageDraw

    drawn = ImageOps.exif_transpose(image).convert("RGB")
    draw = ImageDraw.Draw(drawn)
    width = max(2, round(max(drawn.size) / 400))
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
               (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]
    for rank, detection in enumerate(detections, 1):
        colour = palette[(rank - 1) % len(palette)]
        x0, y0, x1, y1 = detection.box
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        label = f"{rank}. {detection.title} " + (f"{100 * detection.confidence:.0f}%" if detection.confidence is not None
                                                  else f"{detection.score:.2f}")
        left, top, right, bottom = draw.textbbox((x0 + width, y0 + width), label)
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=colour)
        draw.text((x0 + width, y0 + width), label, fill=(255, 255, 255))
    return drawn


def write_drawing(result: LocateResult, folder: Path) -> Path:
    """``result``'s photo (``result.query`` is its path) drawn with its boxes, as
    ``folder/<photo name>.boxes.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(result.query)
    with Image.open(source) as photo:
        drawn = draw_detections(photo, result.detections or [])
    out = folder / f"{source.stem}.boxes.png"
    drawn.save(out)
    return out
