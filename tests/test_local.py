"""Local descriptors, the visual vocabulary, the inverted index, verification, fusion, explanations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catalens.indexer.config import IndexConfig
from catalens.indexer.estimator import NotFittedError
from catalens.indexer.features import sift
from catalens.indexer.features.sift import VOCABULARY, LocalDescriptors, SiftPreparer
from catalens.indexer.features.visual_vocabulary import VisualVocabulary, auto_vocab_size
from catalens.indexer.pipeline import index_catalog
from catalens.indexer.stores.backends import open_catalog
from catalens.indexer.stores.inverted_file import BagOfWords, decode_words, words_feature
from catalens.search.engine import SearchEngine
from catalens.search.settings import SearchSettings
from catalens.search.verification import verify
from tests.conftest import textured_label

DATA = Path(__file__).parent / "data"


def _config(**extra) -> IndexConfig:
    # Tiny catalogs: a small vocabulary so that words are shared at all.
    return IndexConfig(num_workers=0, feature_options={"sift": {"vocab_size": 64, **extra}})


# --- units


def test_descriptor_blob_round_trips_geometry_and_rootsift_rows_in_half_the_bytes():
    described = SiftPreparer(300, 320)(textured_label(1))
    assert 50 < len(described) <= 300
    blob = described.to_bytes()
    assert len(blob) == 16 + 72 * len(described)  # v1 took 144 a keypoint
    back = LocalDescriptors.from_bytes(blob)
    assert back.image_size == (320, 320)
    # Positions and sizes to 1/2048 of the longer side, angles to a quarter degree.
    np.testing.assert_allclose(back.keypoints[:, :3], described.keypoints[:, :3], atol=320 / 2048)
    np.testing.assert_allclose(back.keypoints[:, 3], described.keypoints[:, 3], atol=0.25)
    cosines = np.einsum("ij,ij->i", back.descriptors, described.descriptors) / np.linalg.norm(back.descriptors, axis=1)
    assert cosines.min() > 0.97 and np.median(cosines) > 0.99
    np.testing.assert_allclose(np.linalg.norm(described.descriptors, axis=1), 1.0, atol=1e-4)


def test_blobs_written_by_earlier_versions_still_read():
    described = SiftPreparer(100, 320)(textured_label(4))
    v1 = (np.array([1, len(described), 320, 320], np.uint32).tobytes() + described.keypoints.astype(np.float32).tobytes()
          + np.clip(np.rint(described.descriptors * 512), 0, 255).astype(np.uint8).tobytes())
    back = LocalDescriptors.from_bytes(v1)
    np.testing.assert_allclose(back.keypoints, described.keypoints)
    np.testing.assert_allclose(back.descriptors, described.descriptors, atol=1.5 / 512)
    with pytest.raises(ValueError, match="blob version 7"):
        LocalDescriptors.from_bytes(np.array([7, 0, 1, 1], np.uint32).tobytes())


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
    vocabulary.save(tmp_path / "v.pt")
    loaded = VisualVocabulary.load(tmp_path / "v.pt")
    np.testing.assert_array_equal(loaded.transform(points), vocabulary.transform(points))
    assert loaded.id_ == vocabulary.id_


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


def test_weighted_fusion_lets_a_verified_match_overtake_a_closer_deep_neighbour(tmp_path):
    # Two look-alike labels: the photo of one is closer by deep features to the other, but only
    # its own label verifies; fused ranks the verified one first at a large enough local weight.
    root = tmp_path / "catalog"
    base = textured_label(40)
    (root / "A").mkdir(parents=True)
    base.save(root / "A" / "a.jpg")
    twin = base.copy()
    twin.paste(textured_label(41).crop((0, 0, 160, 320)), (0, 0))
    (root / "B").mkdir()
    twin.save(root / "B" / "b.jpg")
    index_catalog(root, tmp_path / "index", _config(), progress=False)
    catalog = open_catalog(tmp_path / "index")
    try:
        engine = SearchEngine(catalog)
        query = twin.rotate(8, fillcolor=(235, 235, 235))
        weighted = engine.search([query], k=2, settings=SearchSettings(weights={"deep": 1.0, "sift": 2.0}))[0]
        deep_only = engine.search([query], k=2, settings=SearchSettings(weights={"deep": 1.0}))[0]
        local = engine.search([query], k=2, mode="local")[0]
        assert local.results[0].id == "B/b.jpg"
        assert weighted.results[0].id == "B/b.jpg"
        assert weighted.results[0].score > 1.0 > deep_only.results[0].score  # the evidence is what lifted it
        with pytest.raises(ValueError, match="no feature 'ae' in this index"):
            engine.search([query], k=2, settings=SearchSettings(weights={"ae": 1.0}))
    finally:
        catalog.close()


def test_a_query_ranked_against_two_indexes_carries_nothing_from_one_into_the_other(tmp_path):
    # The same id in two catalogs, with another label in each: what the first index computed
    # (its words, its verification of that id) must not answer for the second.
    indexes = []
    for name, seed in (("first", 50), ("second", 51)):
        root = tmp_path / name
        (root / "A").mkdir(parents=True)
        textured_label(seed).save(root / "A" / "item.jpg")
        textured_label(seed + 10).save(root / "A" / "other.jpg")
        index_catalog(root, tmp_path / f"{name}-index", _config(), progress=False)
        indexes.append(open_catalog(tmp_path / f"{name}-index"))
    try:
        from catalens.search.engine import Query

        photo = textured_label(51).rotate(8, fillcolor=(235, 235, 235))
        shared = Query(photo, "photo")
        first, second = (SearchEngine(catalog) for catalog in indexes)
        first.rank(shared, "local", 2)
        fresh = second.rank(Query(photo, "photo"), "local", 2)
        reused = second.rank(shared, "local", 2)
        assert reused[0].tolist() == fresh[0].tolist() and np.allclose(reused[1], fresh[1])
        first_words, second_words = (shared.words(catalog, "sift") for catalog in indexes)
        assert first_words is not second_words  # each index's own vocabulary
    finally:
        for catalog in indexes:
            catalog.close()


# --- through the pipeline


def _catalog(root: Path, n: int) -> Path:
    for i in range(n):
        path = root / ["Dairy/Milk", "Dairy/Yoghurt", "Juice/Apple"][i % 3] / f"item{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        textured_label(100 + i).save(path, quality=95)
    return root


def _words(index_dir: Path) -> dict[int, tuple[bytes, np.ndarray]]:
    """Each item's (vocabulary id, words) as the index stores them."""
    catalog = open_catalog(index_dir)
    try:
        rows = catalog.items.rows(words_feature("sift"))
    finally:
        catalog.close()
    return {key: (blob[:32], decode_words(blob)) for key, blob in rows.items()}


def _vocabulary_file(index_dir: Path) -> Path:
    return index_dir / "models" / "sift_vocabulary.pt"


def test_indexing_fits_vocabulary_and_finds_an_item_from_a_crop(tmp_path):
    catalog = _catalog(tmp_path / "catalog", 9)
    report = index_catalog(catalog, tmp_path / "index", _config(), progress=False)
    assert report.added == 9 and not report.failures
    assert _vocabulary_file(tmp_path / "index").is_file()
    assert len(_words(tmp_path / "index")) == 9
    index = open_catalog(tmp_path / "index")
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
    vocab_mtime = _vocabulary_file(tmp_path / "index").stat().st_mtime_ns
    textured_label(500).save(catalog / "Juice/Apple/new.jpg", quality=95)
    report = index_catalog(catalog, tmp_path / "index", _config(refit_growth=100.0), progress=False)
    assert report.added == 1 and report.extracted == 1
    after = _words(tmp_path / "index")
    assert {vocab for vocab, _ in after.values()} == {vocab for vocab, _ in before.values()}
    assert _vocabulary_file(tmp_path / "index").stat().st_mtime_ns == vocab_mtime
    assert len(after) == 7
    for key, (_, words) in before.items():
        np.testing.assert_array_equal(after[key][1], words)
    (catalog / "Dairy/Milk/item00.jpg").unlink()
    index_catalog(catalog, tmp_path / "index", _config(refit_growth=100.0), progress=False)
    assert len(_words(tmp_path / "index")) == 6


def test_a_run_killed_before_the_local_index_was_derived_is_repaired_by_the_next(tmp_path, monkeypatch):
    catalog = _catalog(tmp_path / "catalog", 6)

    def killed(catalog, progress=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(sift, "fit_vocabulary", killed)
    with pytest.raises(KeyboardInterrupt):
        index_catalog(catalog, tmp_path / "index", _config(), progress=False)
    monkeypatch.undo()
    assert not _words(tmp_path / "index")
    report = index_catalog(catalog, tmp_path / "index", _config(), progress=False)
    assert report.extracted == 0  # SIFT blobs were committed: nothing is decoded again
    assert len(_words(tmp_path / "index")) == 6


def test_local_features_off_extracts_no_sift(tmp_path):
    catalog = _catalog(tmp_path / "catalog", 3)
    config = _config()
    config.features = ["deep", "colour"]
    index_catalog(catalog, tmp_path / "index", config, progress=False)
    index = open_catalog(tmp_path / "index")
    try:
        assert index.items.rows("sift") == {}
        assert not VOCABULARY.path(index).exists()
        assert "local" not in SearchEngine(index).modes()
        (result,) = SearchEngine(index).search([catalog / "Dairy/Milk/item00.jpg"], k=2, mode="fused")
        assert result.results[0].id.endswith("item00.jpg")  # fused falls back to deep
    finally:
        index.close()


def test_explanations_write_one_image_per_result_with_matches(tmp_path):
    from catalens.search.explain import write_explanations

    catalog = _catalog(tmp_path / "catalog", 6)
    index_catalog(catalog, tmp_path / "index", _config(), progress=False)
    index = open_catalog(tmp_path / "index")
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
    index = open_catalog(grocery_index)
    try:
        engine = SearchEngine(index)
        products = set(index.items.categories())
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
    from catalens.indexer.imageio import load_rgb
    from catalens.search.engine import Query
    from catalens.search.fusion import fused_search
    from catalens.search.retrieval import global_search
    from catalens.search.verification import Verifier

    def deep_retriever(engine, query, k, filter):
        return global_search(engine.catalog, query, "deep", k, filter)

    def fused_retriever(engine, query, k, filter):
        return fused_search(engine.catalog, query, engine.weights(), k, filter, engine.settings,
                            Verifier.from_settings(engine.settings))

    photos = [photo for photo in val_photos if photo.top == "Packages"]
    index = open_catalog(grocery_index)
    try:
        engine = SearchEngine(index)
        correct = {"deep": 0, "fused": 0}
        for photo in photos:
            query = Query(load_rgb(photo.path), str(photo.path))  # shared: deep runs once per query
            for name, retriever in (("deep", deep_retriever), ("fused", fused_retriever)):
                keys, _ = retriever(engine, query, 1, None)
                correct[name] += index.items.items([int(keys[0])])[int(keys[0])].category == photo.category
        deep, fused = (100 * correct[name] / len(photos) for name in ("deep", "fused"))
        print(f"Packages top-1 on val: deep {deep:.1f}%, fused {fused:.1f}%")
        assert fused >= deep + 10
    finally:
        index.close()


def test_new_indexes_write_sift_at_256_px_and_older_ones_keep_320(tmp_path):
    from catalens.indexer.config import IndexConfig, settle

    assert IndexConfig().feature_options == {"sift": {"image_size": 256}}
    assert IndexConfig(features=["deep"]).feature_options == {}
    # Stored before the size was written down: built at 320, and a plain run does not change it.
    stored = IndexConfig.from_json({"features": ["deep", "colour", "sift"], "feature_options": {}})
    assert stored.feature_options == {"sift": {"image_size": 320}}
    settled, _ = settle(stored, IndexConfig())
    assert settled.feature_options == {"sift": {"image_size": 320}}
    assert IndexConfig.from_json(IndexConfig().to_json()).feature_options == {"sift": {"image_size": 256}}
