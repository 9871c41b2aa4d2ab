"""Augmented views of catalog images, for adapting the network to the catalog.

A shop's query is a phone photo in a store: another crop, angle and light than the catalog's
photo, often a pile of the product or a full shelf, sometimes blurred or compressed. Photos get
random resized crops, warps, colour casts, blur and JPEG noise (``photo_view``); packshots on
white are cut out and pasted, alone or as a pile of copies, onto synthetic fields, shelves,
clutter of other products or crops of other photos (``packshot_view``), since a network adapted
on clean packshots alone learns nothing about stores.

Every function takes a ``np.random.Generator``, so a view is reproducible from its seed.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageFilter

CANVAS = 320  # composed views are this many pixels square, then preprocessed like any photo


# ---------------------------------------------------------------- packshot cut-out


def cutout(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8, alpha float32 in [0,1]) of a product on a near-white background, cropped to the product."""
    a = np.asarray(image.convert("RGB"))
    near_white = ((a.min(axis=2) > 232) & (a.max(axis=2).astype(int) - a.min(axis=2) < 20)).astype(np.uint8)
    n, labels = cv2.connectedComponents(near_white, connectivity=4)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))) - {0}
    background = np.isin(labels, list(border)) & (near_white > 0)
    fg = (~background).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    if fg.sum() < 0.02 * fg.size:  # not a packshot on white: keep the whole image
        fg[:] = 1
    alpha = cv2.GaussianBlur(fg.astype(np.float32), (3, 3), 0)
    ys, xs = np.nonzero(fg)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return a[y0:y1, x0:x1].copy(), alpha[y0:y1, x0:x1].copy()


# ---------------------------------------------------------------- backgrounds


def _smooth_field(rng: np.random.Generator, size: int) -> np.ndarray:
    cells = rng.integers(2, 9)
    low = rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32)
    base = rng.uniform(0, 255, 3)
    low = 0.5 * low + 0.5 * base  # keep a dominant colour
    low = low * (1 - (d := rng.uniform(0.2, 0.7))) + d * low.mean(axis=2, keepdims=True)  # desaturate
    field = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    field += rng.normal(0, rng.uniform(2, 15), field.shape).astype(np.float32)
    return np.clip(field, 0, 255).astype(np.uint8)


def _shelf(rng: np.random.Generator, size: int) -> np.ndarray:
    canvas = np.empty((size, size, 3), np.float32)
    y = 0
    while y < size:
        h = int(rng.integers(10, 90))
        colour = rng.uniform(0, 255, 3)
        canvas[y : y + h] = 0.5 * colour + 0.5 * colour.mean()
        y += h
    if rng.random() < 0.5:
        canvas = canvas.transpose(1, 0, 2).copy()
    canvas += rng.normal(0, 8, canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _clutter(rng: np.random.Generator, size: int, others: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Other products (cut-outs) strewn over a smooth field: a crowded shelf without the product."""
    canvas = _smooth_field(rng, size).astype(np.float32)
    for _ in range(int(rng.integers(3, 10))):
        rgb, alpha = others[int(rng.integers(len(others)))]
        _paste(rng, canvas, rgb, alpha, scale=rng.uniform(0.2, 0.5), rotate=30)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _photo_crop(rng: np.random.Generator, size: int, photo: Image.Image) -> np.ndarray:
    a = np.asarray(photo)
    h, w = a.shape[:2]
    side = int(min(h, w) * rng.uniform(0.3, 1.0))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return cv2.resize(a[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_LINEAR)


def background(rng: np.random.Generator, size: int, others, photos) -> np.ndarray:
    kinds = ["field", "shelf", "clutter"] + (["photo", "photo"] if photos else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "field":
        return _smooth_field(rng, size)
    if kind == "shelf":
        return _shelf(rng, size)
    if kind == "clutter":
        return _clutter(rng, size, others)
    return _photo_crop(rng, size, photos[int(rng.integers(len(photos)))])


# ---------------------------------------------------------------- composition


def _paste(rng, canvas: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, scale: float, rotate: float,
           centre: tuple[float, float] | None = None) -> None:
    """Alpha-blend the cut-out onto ``canvas`` (float32, in place), longer side = scale * canvas side."""
    size = canvas.shape[0]
    h, w = rgb.shape[:2]
    factor = scale * size / max(h, w)
    nh, nw = max(2, int(h * factor)), max(2, int(w * factor))
    rgb_s = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA).astype(np.float32)
    alpha_s = cv2.resize(alpha, (nw, nh), interpolation=cv2.INTER_AREA)
    angle = rng.uniform(-rotate, rotate)
    if centre is None:
        centre = (rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size)
    matrix = cv2.getRotationMatrix2D((nw / 2, nh / 2), angle, 1.0)
    matrix[:, 2] += np.array(centre) - np.array([nw / 2, nh / 2])
    warped = cv2.warpAffine(rgb_s, matrix, (size, size), flags=cv2.INTER_LINEAR)
    a = cv2.warpAffine(alpha_s, matrix, (size, size), flags=cv2.INTER_LINEAR)[..., None]
    # a little shading so copies in a pile are not identical
    warped *= rng.uniform(0.8, 1.1)
    canvas *= 1 - a
    canvas += a * warped


def compose(rng, product: tuple[np.ndarray, np.ndarray], others, photos, pile_p: float = 0.5) -> Image.Image:
    """The product on a background: alone (large, tilted) or as a pile/shelf of copies."""
    size = CANVAS
    canvas = background(rng, size, others, photos).astype(np.float32)
    rgb, alpha = product
    if rng.random() < pile_p:
        n = int(rng.integers(4, 13))
        grid = int(np.ceil(np.sqrt(n)))
        scale = rng.uniform(1.0, 1.6) / grid  # neighbours touch or overlap, as in a pile or a full shelf
        cells = [(i, j) for i in range(grid + 1) for j in range(grid + 1)]
        rng.shuffle(cells)
        for i, j in cells[:n + 2]:
            cx = (j + rng.uniform(-0.3, 0.3)) * size / grid
            cy = (i + rng.uniform(-0.3, 0.3)) * size / grid
            _paste(rng, canvas, rgb, alpha, scale * rng.uniform(0.85, 1.15), rotate=40, centre=(cx, cy))
    else:
        _paste(rng, canvas, rgb, alpha, scale=rng.uniform(0.5, 0.95), rotate=20)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------- photometric and geometric


def random_resized_crop(rng, image: Image.Image, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(area * r))), int(round(np.sqrt(area / r)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return image.crop((x, y, x + cw, y + ch))
    side = min(w, h)
    return image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))


def perspective(rng, image: Image.Image, strength: float = 0.12) -> Image.Image:
    a = np.asarray(image)
    h, w = a.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = src + rng.uniform(-strength, strength, (4, 2)).astype(np.float32) * np.float32([w, h])
    matrix = cv2.getPerspectiveTransform(src, dst)
    return Image.fromarray(cv2.warpPerspective(a, matrix, (w, h), borderMode=cv2.BORDER_REFLECT))


def rotate(rng, image: Image.Image, degrees: float) -> Image.Image:
    a = np.asarray(image)
    h, w = a.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-degrees, degrees), 1.0)
    return Image.fromarray(cv2.warpAffine(a, matrix, (w, h), borderMode=cv2.BORDER_REFLECT))


def colour_jitter(rng, image: Image.Image, strength: float = 0.3, hue: float = 0.02) -> Image.Image:
    a = np.asarray(image).astype(np.float32)
    a = a * rng.uniform(1 - strength, 1 + strength)  # brightness
    mean = a.mean()
    a = (a - mean) * rng.uniform(1 - strength, 1 + strength) + mean  # contrast
    grey = a.mean(axis=2, keepdims=True)
    a = (a - grey) * rng.uniform(1 - strength, 1 + strength) + grey  # saturation
    a = np.clip(a, 0, 255).astype(np.uint8)
    if hue:
        hsv = cv2.cvtColor(a, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(int) + int(round(rng.uniform(-hue, hue) * 180))) % 180
        a = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    # a colour cast (white balance of a shop's lights)
    a = np.clip(a.astype(np.float32) * rng.uniform(0.9, 1.1, 3), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def degrade(rng, image: Image.Image) -> Image.Image:
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.8)))
    if rng.random() < 0.5:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(rng.integers(25, 90)))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def photo_view(rng, image: Image.Image) -> Image.Image:
    """A training view of a real photo."""
    image = random_resized_crop(rng, image)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.3:
        image = rotate(rng, image, 15)
    if rng.random() < 0.3:
        image = perspective(rng, image)
    image = colour_jitter(rng, image)
    return degrade(rng, image)


def packshot_view(rng, image: Image.Image, product, others, photos, paste_p: float = 0.8,
                  pile_p: float = 0.5) -> Image.Image:
    """A training view of a catalog packshot: usually pasted on a background, else a plain photo view."""
    if rng.random() < paste_p:
        view = compose(rng, product, others, photos, pile_p)
        if rng.random() < 0.5:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < 0.3:
            view = perspective(rng, view)
        # mild crop so the product is not always whole
        view = random_resized_crop(rng, view, scale=(0.5, 1.0))
        view = colour_jitter(rng, view)
        return degrade(rng, view)
    return photo_view(rng, image)
