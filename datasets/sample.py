"""A small generated catalog for the demo and quick tests: drawn 'products' in a category tree.

Generated rather than downloaded, so the demo works offline on a fresh machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from catalens.datasets.catalog import CatalogItem, write_manifest

_BRANDS = ["NORDA", "SOLMA", "KVIST", "BERGO", "LUMEN", "FJORD"]
_CATEGORIES = [
    ("Packages/Milk", "carton"),
    ("Packages/Juice", "carton"),
    ("Packages/Yoghurt", "cup"),
    ("Fruit/Apple", "round"),
    ("Fruit/Citrus", "round"),
    ("Vegetables/Root", "long"),
]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def draw_sample_product(seed: int, shape: str, brand: str, size: int = 320) -> Image.Image:
    rng = np.random.default_rng(seed)
    background = tuple(int(v) for v in rng.integers(200, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    body = tuple(int(v) for v in rng.integers(20, 230, 3))
    accent = tuple(int(v) for v in rng.integers(0, 255, 3))
    if shape == "carton":
        draw.rectangle((90, 40, 230, 290), fill=body, outline=(30, 30, 30), width=3)
        draw.polygon([(90, 40), (160, 10), (230, 40)], fill=accent)
        draw.rectangle((100, 120, 220, 170), fill=(250, 250, 250))
        draw.text((108, 132), brand, fill=accent, font=_font(26))
        for stripe in range(int(rng.integers(2, 5))):
            y = 190 + stripe * 22
            draw.rectangle((90, y, 230, y + 10), fill=accent)
    elif shape == "cup":
        draw.polygon([(80, 80), (240, 80), (215, 280), (105, 280)], fill=body, outline=(30, 30, 30))
        draw.ellipse((80, 60, 240, 100), fill=accent)
        draw.text((110, 160), brand, fill=(255, 255, 255), font=_font(24))
    elif shape == "round":
        radius = int(rng.integers(90, 120))
        draw.ellipse((160 - radius, 170 - radius, 160 + radius, 170 + radius), fill=body)
        draw.ellipse((150, 40, 175, 75), fill=(60, 120, 40))
        for _ in range(int(rng.integers(5, 15))):
            x, y = rng.integers(90, 230, 2)
            draw.ellipse((x, y, x + 6, y + 6), fill=accent)
    else:
        draw.polygon([(60, 250), (250, 60), (275, 90), (90, 280)], fill=body)
        draw.polygon([(250, 60), (290, 20), (300, 50), (275, 90)], fill=(60, 140, 50))
    return image


def write_sample_catalog(folder: str | Path, items_per_category: int = 4) -> tuple[Path, list[CatalogItem]]:
    """Write the images and a JSONL manifest; returns (manifest path, items)."""
    folder = Path(folder)
    items = []
    for category_index, (category, shape) in enumerate(_CATEGORIES):
        for number in range(items_per_category):
            seed = category_index * 100 + number
            brand = _BRANDS[(category_index + number) % len(_BRANDS)]
            path = folder / "images" / category / f"{brand.lower()}-{number}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_sample_product(seed, shape, brand).save(path, quality=92)
            item_id = f"sku-{category_index:02d}{number:02d}"
            title = f"{brand.title()} {category.rsplit('/', 1)[-1].lower()} #{number}"
            items.append(CatalogItem(item_id, path, category, title, {"brand": brand}))
    return write_manifest(items, folder / "catalog.jsonl"), items


def shop_photo(image: Image.Image, seed: int = 0) -> Image.Image:
    """The same product as a shop would photograph it: tilted, closer, warmer light, slight blur."""
    rng = np.random.default_rng(seed)
    width, height = image.size
    photo = image.rotate(float(rng.uniform(-12, 12)), resample=Image.BICUBIC, expand=False, fillcolor=(180, 170, 160))
    margin = int(width * 0.08)
    photo = photo.crop((margin, margin, width - margin, height - margin)).resize((width, height))
    array = np.asarray(photo, dtype=np.float32) * np.array([1.08, 1.0, 0.9]) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
