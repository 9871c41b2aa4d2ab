"""`catalens demo`: generate a sample catalog, index it, and answer a shop photo of one item."""

from __future__ import annotations

from pathlib import Path

from catalens.api.tables import search_lines


def run_demo(workdir: Path) -> int:
    from catalens.api.service import CatalogService, index
    from catalens.datasets.sample import shop_photo, write_sample_catalog
    from catalens.indexer.config import IndexConfig

    workdir.mkdir(parents=True, exist_ok=True)
    manifest, items = write_sample_catalog(workdir / "catalog")
    print(f"sample catalog: {len(items)} items in {len({i.category for i in items})} categories -> {manifest}")
    report = index(manifest, workdir / "index", IndexConfig(), progress=True)
    print(f"indexed {report.added} new, {report.unchanged} unchanged, {len(report.failures)} failed "
          f"in {report.seconds:.1f}s")

    wanted = items[5]
    from PIL import Image

    query_path = workdir / "query-shop-photo.jpg"
    shop_photo(Image.open(wanted.image).convert("RGB"), seed=7).save(query_path, quality=90)
    service = CatalogService.open(workdir / "index")
    mode = service.settings.mode or "fused"
    result = service.search([query_path], k=5)[0]
    service.close()
    print(f"\nquery: {query_path} (a shop photo of {wanted.id}, '{wanted.title}'), mode {mode}")
    print("\n".join(search_lines(result, mode)).lstrip("\n"))
    found = bool(result.results) and result.results[0].id == wanted.id
    print("\ntop result is the photographed item" if found else "\ntop result is NOT the photographed item")
    print(f"try: catalens search {query_path} --index {workdir / 'index'}")
    return 0 if found else 1
