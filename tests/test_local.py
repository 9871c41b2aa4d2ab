"""Local descriptors, the visual vocabulary, the inverted index, verification, fusion, explanations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.config import IndexConfig
from indexer.index import CatalogIndex
from indexer.local import (
    VOCAB_FILE,
    WORDS_FILE,
    BagOfWords,
    LocalDescriptors,
    LocalExtension,
    NotFittedError,
    SiftPreparer,
    VisualVocabulary,
    _WordTable,
    auto_vocab_size,
    load_local_index,
)
from indexer.pipeline import index_catalog
from search.engine import SearchEngine
from search.fusion import FusionConfig, fuse_scores
from search.geometry import verify
from tests.conftest import textured_label

DATA = Path(__file__).parent / "data"


def _config(**extra) -> IndexConfig:
    # Tiny catalogs: a small vocabulary so that words are shared at all.
    return IndexConfig(num_workers=0, extra={"local": {"vocab_size": 64, **extra}})


# --- units


def test_descriptor_blob_round_trips_geometry_and_rootsift_rows():
    described = SiftPreparer(300, 320)(textured_label(1))
    assert 50 < len(described) <= 300
    back = LocalDescriptors.from_bytes(described.to_bytes())
    np.testing.assert_allclose(back.keypoints, described.keypoints)
    assert back.image_size == (320, 320)
    np.testing.assert_allclose(back.descriptors, described.descriptors, atol=1.5 / 512)
    np.testing.assert_allclose(np.linalg.norm(described.descriptors, axis=1), 1.0, atol=1e-4)


def test_keypoints_are_in_original_pixel_coordinates_whatever_the_working_size():
    image = textured_label(2, size=640)
    described = SiftPreparer(300, 320)(image)
    assert described.keypoints[:, :2].max() > 330  # the working copy is 320 px; geometry is not
    assert described.image_size == (640, 640)


def test_keypoint_cap_is_honoured():
    assert len(SiftPreparer(40, 320)(textured_label(3))) <= 40


def test_vocabulary_must_be_fitted_before_transform():
    with pytest.raises(NotFittedError):
        VisualVocabulary(8).transform(np.zeros((3, 128), np.float32))


def test_vocabulary_assigns_descriptors_to_their_cluster(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 128)).astype(np.float32) * 10
    points = np.concatenate([c + rng.normal(size=(50, 128)).astype(np.float32) for c in centres])
    vocabulary = VisualVocabulary(4, seed=0, restarts=5).fit(points)
    words = vocabulary.transform(points).reshape(4, 50)
    assert all(len(set(row)) == 1 for row in words) and len({row[0] for row in words}) == 4
    vocabulary.save(tmp_path / "v.npz")
    loaded, _ = VisualVocabulary.load(tmp_path / "v.npz")
    np.testing.assert_array_equal(loaded.transform(points), vocabulary.transform(points))


def test_auto_vocabulary_grows_with_the_catalog():
    assert auto_vocab_size(1_000) == 2048
    assert auto_vocab_size(3_000) == 4096
    assert auto_vocab_size(1_000_000) == 65536


def test_inverted_index_ranks_items_sharing_rare_words_first():
    words = [np.array([0, 1, 2, 3]), np.array([0, 0, 5, 6]), np.array([0, 7, 8, 9]), np.array([4, 4, 4, 4])]
    bow = BagOfWords.build(np.array([10, 11, 12, 13]), words, 10)
    keys, scores = bow.search(np.array([0, 7, 8]), k=4)
    assert keys[0] == 12 and scores[0] > scores[1]
    assert 13 not in keys  # shares no word: never touched
    keys, _ = bow.search(np.array([0, 7, 8]), k=4, allowed=np.array([10, 11]))
    assert set(keys) <= {10, 11}


def test_verification_separates_a_rotated_scaled_copy_from_another_image():
    preparer = SiftPreparer(400, 320)
    original = textured_label(4)
    copy = original.rotate(20, expand=True, fillcolor=(235, 235, 235)).resize((260, 260))
    query = preparer(copy)
    same = verify(query, preparer(original))
    other = verify(query, preparer(textured_label(5)))
    assert same.inliers >= 30
    assert other.inliers < 8
    assert same.pairs.shape == (same.inliers, 2)


def test_weighted_fusion_lets_a_verified_match_overtake_a_closer_deep_neighbour():
    config = FusionConfig(local_weight=0.5, inlier_cap=30)
    keys, _ = fuse_scores(np.array([1, 2, 3]), np.array([0.9, 0.85, 0.8]), np.array([3, 4]), {3: 30, 4: 5}, config, 8)
    assert keys[0] == 3
    assert list(keys).index(4) > list(keys).index(2)  # 5 inliers is chance: no boost
    keys, _ = fuse_scores(np.array([1, 2]), np.array([0.9, 0.85]), np.array([2]), {}, config, 8)
    assert list(keys) == [1, 2]


# --- through the pipeline


def _catalog(root: Path, n: int) -> Path:
    for i in range(n):
        path = root / ["Dairy/Milk", "Dairy/Yoghurt", "Juice/Apple"][i % 3] / f"item{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        textured_label(100 + i).save(path, quality=95)
    return root


def _words(index_dir: Path) -> _WordTable:
    return _WordTable.load(index_dir / "models" / WORDS_FILE)


def test_indexing_fits_vocabulary_and_finds_an_item_from_a_crop(tmp_path):
    catalog = _catalog(tmp_path / "catalog", 9)
    report = index_catalog(catalog, tmp_path / "index", _config(), progress=False)
    assert report.added == 9 and not report.failures
    assert (tmp_path / "index" / "models" / VOCAB_FILE).is_file()
    assert len(_words(tmp_path / "index").keys) == 9
    index = CatalogIndex.open(tmp_path / "index")
    try:
        target = catalog / "Dairy/Yoghurt/item04.jpg"
        crop = Image.open(target).convert("RGB").crop((60, 60, 220, 220)).resize((240, 240))
        (result,) = SearchEngine(index).search([crop], k=3, mode="local")
        assert result.results[0].id.endswith("item04.jpg")
        assert result.results[0].score >= 8  # verified: inliers count in the score
        (fused,) = SearchEngine(index).search([crop], k=3, mode="fused")
        assert fused.results[0].id.endswith("item04.jpg")
    finally:
        index.close()


def test_adding_items_quantises_only_the_new_ones_and_removing_drops_them(tmp_path):
    catalog = _catalog(tmp_path / "catalog", 6)
    index_catalog(catalog, tmp_path / "index", _config(refit_growth=100.0), progress=False)
    before = _words(tmp_path / "index")
    vocab_mtime = (tmp_path / "index" / "models" / VOCAB_FILE).stat().st_mtime_ns
    textured_label(500).save(catalog / "Juice/Apple/new.jpg", quality=95)
    report = index_catalog(catalog, tmp_path / "index", _config(refit_growth=100.0), progress=False)
    assert report.added == 1 and report.extracted == 1
    after = _words(tmp_path / "index")
    assert after.vocab_id == before.vocab_id
    assert (tmp_path / "index" / "models" / VOCAB_FILE).stat().st_mtime_ns == vocab_mtime
    assert len(after.keys) == 7
    kept = {k: w for k, (_, w) in after.to_dict().items()}
    for key, (_, words) in before.to_dict().items():
        np.testing.assert_array_equal(kept[key], words)
    (catalog / "Dairy/Milk/item00.jpg").unlink()
    index_catalog(catalog, tmp_path / "index", _config(refit_growth=100.0), progress=False)
    assert len(_words(tmp_path / "index").keys) == 6


def test_a_run_killed_before_the_local_index_was_derived_is_repaired_by_the_next(tmp_path, monkeypatch):
    catalog = _catalog(tmp_path / "catalog", 6)

    def killed(self, index, changed, removed):
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalExtension, "after_update", killed)
    with pytest.raises(KeyboardInterrupt):
        index_catalog(catalog, tmp_path / "index", _config(), progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "index" / "models" / WORDS_FILE).exists()
    report = index_catalog(catalog, tmp_path / "index", _config(), progress=False)
    assert report.extracted == 0  # SIFT blobs were committed: nothing is decoded again
    assert len(_words(tmp_path / "index").keys) == 6


def test_local_features_off_extracts_no_sift(tmp_path):
    catalog = _catalog(tmp_path / "catalog", 3)
    config = _config()
    config.local_features = False
    index_catalog(catalog, tmp_path / "index", config, progress=False)
    index = CatalogIndex.open(tmp_path / "index")
    try:
        assert index.store.feature_blobs("sift") == {}
        assert load_local_index(index) is None
        (result,) = SearchEngine(index).search([catalog / "Dairy/Milk/item00.jpg"], k=2, mode="fused")
        assert result.results[0].id.endswith("item00.jpg")  # fused falls back to deep
    finally:
        index.close()


def test_explanations_write_one_image_per_result_with_matches(tmp_path):
    from search.explain import write_explanations

    catalog = _catalog(tmp_path / "catalog", 6)
    index_catalog(catalog, tmp_path / "index", _config(), progress=False)
    index = CatalogIndex.open(tmp_path / "index")
    try:
        engine = SearchEngine(index)
        (result,) = engine.search([catalog / "Juice/Apple/item02.jpg"], k=3, mode="local")
        paths = write_explanations(engine, result, tmp_path / "explain")
        assert len(paths) == len(result.results) >= 1
        first = np.asarray(Image.open(paths[0]))
        assert first.shape[0] > 300 and first.shape[1] > 600  # query and result side by side
    finally:
        index.close()


# --- on the grocery data (the session's shared index)


def _logo_crops(grocery: Path) -> list[tuple[Image.Image, str]]:
    boxes = json.loads((DATA / "logo_boxes.json").read_text())["crops"]
    return [(Image.open(grocery / crop["image"]).convert("RGB").crop(tuple(crop["box"])), crop["brand"]) for crop in boxes]


def brand_of(category: str) -> str:
    return category.rsplit("/", 1)[-1].replace("-", " ")


def product_average_precision(categories: list[str], brand: str, relevant: int) -> float:
    """AP over the ranked distinct products (first appearance), relevant = the brand's products."""
    seen, hits, total = set(), 0, 0.0
    for category in categories:
        if category in seen:
            continue
        seen.add(category)
        if brand_of(category).startswith(brand):
            hits += 1
            total += hits / len(seen)
    return total / relevant if relevant else 0.0


@pytest.mark.slow
def test_logo_crops_find_products_of_their_brand(grocery, grocery_index):
    index = CatalogIndex.open(grocery_index)
    try:
        engine = SearchEngine(index)
        products = set(index.store.categories())
        by_brand: dict[str, list[float]] = {}
        for crop, brand in _logo_crops(grocery):
            relevant = sum(brand_of(c).startswith(brand) for c in products)
            (result,) = engine.search([crop], k=100, mode="local")
            ap = product_average_precision([hit.category for hit in result.results], brand, relevant)
            by_brand.setdefault(brand, []).append(ap)
        mean_ap = float(np.mean([np.mean(v) for v in by_brand.values()]))
        print(f"logo mAP over {len(by_brand)} brands: {mean_ap:.3f}")
        assert len(by_brand) == 9
        assert mean_ap >= 0.5
    finally:
        index.close()


@pytest.mark.slow
def test_fused_beats_deep_by_ten_points_on_packages(grocery_index, val_photos):
    from indexer.imageio import load_rgb
    from search.engine import Query, deep_retriever
    from search.fusion import fused_retriever

    photos = [photo for photo in val_photos if photo.top == "Packages"]
    index = CatalogIndex.open(grocery_index)
    try:
        engine = SearchEngine(index)
        correct = {"deep": 0, "fused": 0}
        for photo in photos:
            query = Query(load_rgb(photo.path), str(photo.path))  # shared: deep runs once per query
            for name, retriever in (("deep", deep_retriever), ("fused", fused_retriever)):
                keys, _ = retriever(engine, query, 1, None)
                correct[name] += index.store.items([int(keys[0])])[int(keys[0])].category == photo.category
        deep, fused = (100 * correct[name] / len(photos) for name in ("deep", "fused"))
        print(f"Packages top-1 on val: deep {deep:.1f}%, fused {fused:.1f}%")
        assert fused >= deep + 10
    finally:
        index.close()
