"""The few-shot hierarchical classifier, the finetuned projection head and the classify CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from catalens.search.classify import (
    UNKNOWN,
    ClassifyResult,
    HierarchicalFewShotClassifier,
    LevelPrediction,
)


def _tree_data(rng, per_leaf, dim=64, spread=0.15):
    """Features clustered by a 2x2x2 tree: siblings share their parents' direction."""
    rows, paths = [], []
    tops = rng.normal(size=(2, dim))
    for a in range(2):
        for b in range(2):
            mid = tops[a] + 0.8 * rng.normal(size=dim)
            for c in range(2):
                leaf = mid + 0.6 * rng.normal(size=dim)
                for _ in range(per_leaf):
                    rows.append(np.abs(leaf + spread * rng.normal(size=dim)))
                    paths.append(f"T{a}/M{a}{b}/L{a}{b}{c}")
    return np.array(rows, dtype=np.float32), np.array(paths)


def test_one_example_per_leaf_classifies_noisy_copies():
    rng = np.random.default_rng(0)
    support, paths = _tree_data(rng, per_leaf=1)
    queries = np.abs(support + 0.05 * rng.normal(size=support.shape)).astype(np.float32)
    classifier = HierarchicalFewShotClassifier().fit(support, paths)
    assert (classifier.predict(queries) == paths).mean() == 1.0


def test_level_predictions_are_consistent_and_confidences_do_not_grow_with_depth():
    rng = np.random.default_rng(1)
    support, paths = _tree_data(rng, per_leaf=4)
    classifier = HierarchicalFewShotClassifier(level_threshold=0.0).fit(support, paths)
    queries = np.abs(rng.normal(size=(30, support.shape[1]))).astype(np.float32)
    for prediction in classifier.predict_paths(queries):
        if prediction.category == UNKNOWN:
            continue
        assert prediction.category in set(paths)  # with no threshold the path reaches an existing leaf
        confidences = [level.confidence for level in prediction.levels]
        assert confidences == sorted(confidences, reverse=True)


def test_answer_stops_at_the_deepest_confident_level():
    rng = np.random.default_rng(2)
    support, paths = _tree_data(rng, per_leaf=4, spread=0.5)
    classifier = HierarchicalFewShotClassifier(level_threshold=0.6).fit(support, paths)
    leaf_a, leaf_b = support[paths == "T0/M00/L000"].mean(0), support[paths == "T0/M00/L001"].mean(0)
    # Walking from one sibling leaf to the other, the leaf becomes a coin toss before the parent does.
    walk = np.array([(1 - t) * leaf_a + t * leaf_b for t in np.linspace(0, 1, 21)], dtype=np.float32)
    predictions = classifier.predict_paths(walk)
    assert predictions[0].category == "T0/M00/L000" and predictions[-1].category == "T0/M00/L001"
    stopped = [p for p in predictions if p.category == "T0/M00"]
    assert stopped, [p.category for p in predictions]
    for prediction in stopped:
        assert [level.name for level in prediction.levels] == ["T0", "M00"]
        assert prediction.levels[-1].confidence >= 0.6


def test_far_from_every_category_is_unknown():
    rng = np.random.default_rng(3)
    support, paths = _tree_data(rng, per_leaf=3)
    classifier = HierarchicalFewShotClassifier().fit(support, paths)
    outlier = np.zeros((1, support.shape[1]), dtype=np.float32)
    outlier[0, :3] = 1.0
    (prediction,) = classifier.predict_paths(outlier)
    assert prediction.category == UNKNOWN and prediction.levels == []


def test_linear_model_only_for_categories_with_enough_support():
    rng = np.random.default_rng(4)
    support, paths = _tree_data(rng, per_leaf=2)
    big, big_paths = _tree_data(np.random.default_rng(4), per_leaf=12)
    keep = np.isin(big_paths, ["T0/M00/L000", "T1/M11/L111"])
    classifier = HierarchicalFewShotClassifier(linear_min_support=8, knn_min_support=3).fit(
        np.concatenate([support, big[keep]]), np.concatenate([paths, big_paths[keep]])
    )
    assert sorted(classifier.leaves_[classifier.linear_leaves_]) == ["T0/M00/L000", "T1/M11/L111"]
    probs, _, _ = classifier.leaf_proba(support)
    assert np.allclose(probs.sum(axis=1), 1.0)


def test_predict_before_fit_fails_clearly():
    from catalens.indexer.estimator import NotFittedError

    with pytest.raises(NotFittedError):
        HierarchicalFewShotClassifier().predict(np.ones((1, 4), dtype=np.float32))


def test_result_json_matches_the_contract():
    result = ClassifyResult("q.jpg", "A/B", [LevelPrediction("A", 0.97), LevelPrediction("B", 0.61)], ["x", "y"])
    assert result.to_json() == {
        "query": "q.jpg", "category": "A/B",
        "levels": [{"name": "A", "confidence": 0.97}, {"name": "B", "confidence": 0.61}], "neighbours": ["x", "y"],
    }
    assert ClassifyResult("bad.jpg", error="cannot decode").to_json() == {"query": "bad.jpg", "error": "cannot decode"}


def test_triplet_head_separates_classes_the_raw_features_confuse():
    from catalens.indexer.training.projection import TripletProjection

    rng = np.random.default_rng(5)
    # Two classes that differ only in 2 of 64 dims, drowned by shared noise in the rest.
    base = np.abs(rng.normal(size=64)) + 1
    rows, labels = [], []
    for label in range(2):
        for _ in range(40):
            row = base + 0.6 * rng.normal(size=64)
            row[label] += 1.5
            rows.append(np.abs(row))
            labels.append(f"C/{label}")
    rows, labels = np.array(rows, dtype=np.float32), np.array(labels)
    head = TripletProjection(out_dim=16, hidden=64, steps=100, classes_per_batch=2, per_class=8).fit(rows[::2], labels[::2])
    assert head.losses_[-1] < head.losses_[0]
    test, test_labels = head.transform(rows[1::2]), labels[1::2]
    train = head.transform(rows[::2])
    nearest = (test @ train.T).argmax(axis=1)
    raw_train, raw_test = rows[::2] / np.linalg.norm(rows[::2], axis=1, keepdims=True), rows[1::2]
    raw_nearest = (raw_test @ raw_train.T).argmax(axis=1)
    head_accuracy = (labels[::2][nearest] == test_labels).mean()
    assert head_accuracy >= 0.85
    assert head_accuracy > (labels[::2][raw_nearest] == test_labels).mean()
    assert np.allclose(np.linalg.norm(test, axis=1), 1.0, atol=1e-5)


@pytest.fixture()
def tiny_index(tiny_catalog, tmp_path):
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog

    index_catalog(tiny_catalog, tmp_path / "index", IndexConfig(), progress=False)
    return tmp_path / "index"


def test_classify_cli_json_lines_and_unreadable_image(tiny_index, tiny_catalog, tmp_path, capsys):
    from catalens.api.cli import main

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    query = sorted((tiny_catalog / "Dairy" / "Milk").glob("*.jpg"))[0]
    assert main(["classify", str(query), str(bad), "--index", str(tiny_index), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["query"] == str(query)
    assert set(lines[0]) == {"query", "category", "levels", "neighbours"}
    assert lines[0]["category"].startswith("Dairy/Milk")  # an indexed image finds its own category
    assert lines[0]["neighbours"][0].endswith(query.name)
    assert lines[1]["query"] == str(bad) and "error" in lines[1]


def test_classify_cli_prints_a_table(tiny_index, tiny_catalog, capsys):
    from catalens.api.cli import main

    query = sorted((tiny_catalog / "Fruit" / "Apple").glob("*.jpg"))[0]
    assert main(["classify", str(query), "--index", str(tiny_index)]) == 0
    out = capsys.readouterr().out
    assert "confidence" in out and "Fruit" in out


@pytest.mark.slow
def test_grocery_classify_on_val_beats_chance_by_far(grocery_index, val_photos):
    from catalens.indexer.backends import open_catalog
    from catalens.search.classify import classify

    index = open_catalog(grocery_index)
    sample = val_photos[::12]
    results = classify(index, [photo.path for photo in sample])
    top = np.mean([r.category.split("/")[0] == p.top for r, p in zip(results, sample, strict=True)])
    assert top >= 0.85


def test_finetune_cli_reports_and_stores_the_head_only_where_it_helps(tiny_index, tiny_catalog, capsys):
    from catalens.api.cli import main
    from catalens.indexer.backends import open_catalog
    from catalens.indexer.training.projection import HEAD_FEATURE, HEAD_FILE
    from catalens.search.engine import SearchEngine

    assert main(["finetune", "--index", str(tiny_index), "--steps", "20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"search_raw", "search_projected", "kept"} <= set(report)
    assert report["kept"] == (report["search_projected"] >= report["search_raw"] + 0.005)
    index = open_catalog(tiny_index)
    try:
        assert (index.models_dir / HEAD_FILE).is_file() == report["kept"] == (HEAD_FEATURE in index.config.features)
        engine = SearchEngine(index)
        if report["kept"]:  # kept, it stands in for deep in search, and every item has its row
            assert engine.weights() == {HEAD_FEATURE: 1.0, "sift": 0.2}
            assert index.vectors(HEAD_FEATURE).ntotal == 12
        else:
            assert engine.weights() == {"deep": 1.0, "sift": 0.2}
        query = sorted((tiny_catalog / "Dairy" / "Milk").glob("*.jpg"))[0]
        assert engine.search([query], k=1)[0].results[0].id.endswith(query.name)
    finally:
        index.close()


def test_verified_evidence_overrides_a_close_feature_call():
    """Two leaves the features cannot tell apart: a verified match of one decides."""
    from catalens.search.classify import EvidenceConfig, verified_evidence

    rng = np.random.default_rng(3)
    base = np.abs(rng.normal(size=64)).astype(np.float32)
    support = np.stack([base + 0.01 * rng.normal(size=64), base + 0.01 * rng.normal(size=64)]).astype(np.float32)
    classifier = HierarchicalFewShotClassifier().fit(support, ["P/Milk/A", "P/Milk/B"])
    query = base[None]
    inliers = {0: 3, 1: 25}  # support row 1 (leaf B) matches geometrically; row 0 below chance
    evidence = verified_evidence(classifier, query, lambda row, support_row: inliers[support_row], EvidenceConfig())
    b = list(classifier.leaves_).index("P/Milk/B")
    assert evidence[0, b] == pytest.approx(25 / 30) and evidence[0, 1 - b] == 0.0
    assert classifier.predict(query, evidence)[0] == "P/Milk/B"
    probs, _, _ = classifier.leaf_proba(query, evidence)
    assert probs[0, b] > 0.9 and np.isclose(probs.sum(), 1.0)


def test_colour_histogram_tells_apart_what_differs_only_in_colour(tmp_path):
    from PIL import Image

    from catalens.indexer.features import embed
    from catalens.indexer.features.colour import ColourHistogram

    feature = ColourHistogram()
    red, red_big, green = Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (900, 600), (205, 36, 30)), Image.new("RGB", (300, 200), (30, 180, 40))
    rows = embed(feature, [red, red_big, green])
    assert rows.shape == (3, feature.dim) and np.allclose(np.linalg.norm(rows, axis=1), 1.0)
    assert rows[0] @ rows[1] > 0.99 > 0.1 > rows[0] @ rows[2]


def test_index_keeps_colour_rows_and_classify_uses_them(tiny_index, tiny_catalog):
    from catalens.indexer.backends import open_catalog
    from catalens.search.classify import classify, fitted_classifier

    index = open_catalog(tiny_index)
    assert index.dims()["colour"] == 192
    fitted = fitted_classifier(index)
    assert fitted.weights == {"deep": 1.0, "colour": 0.6}
    assert fitted.classifier.support_.shape[1] == index.dims()["deep"] + 192
    query = sorted((tiny_catalog / "Dairy" / "Yoghurt").glob("*.jpg"))[0]
    assert classify(index, [query])[0].category.startswith("Dairy/Yoghurt")


def test_top_block_finetune_adds_rows_for_every_item_new_ones_too_and_classify_uses_them(tiny_index, tiny_catalog, capsys):
    from catalens.api.cli import main
    from catalens.indexer.backends import open_catalog
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog
    from catalens.search.classify import classify, fitted_classifier
    from tests.conftest import draw_product

    assert main(["finetune", "--index", str(tiny_index), "--top-block", "--epochs", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == 12 and report["categories"] == 3
    index = open_catalog(tiny_index)
    assert len(index.items.row_keys("deep_ft")) == 12 and index.vectors("deep_ft").ntotal == 12
    index.close()

    draw_product(tiny_catalog / "Fruit/Apple/new.jpg", seed=77)
    added = index_catalog(tiny_catalog, tiny_index, IndexConfig(), progress=False)
    assert added.added == 1 and not added.failures
    index = open_catalog(tiny_index)
    assert len(index.items.row_keys("deep_ft")) == 13
    fitted = fitted_classifier(index)
    assert fitted.weights == {"deep_ft": 1.0, "colour": 0.6}  # the fine-tuned rows stand in for deep
    assert fitted.classifier.support_.shape[1] == index.dims()["deep_ft"] + 192
    query = sorted((tiny_catalog / "Dairy" / "Milk").glob("*.jpg"))[0]
    assert classify(index, [query])[0].category.startswith("Dairy/Milk")


def test_fine_tuned_top_keeps_which_stages_it_trained_and_loads_as_it_was_saved(tmp_path):
    from catalens.indexer.estimator import ModelFileError
    from catalens.indexer.training.top_blocks import FineTunedTop

    rng = np.random.default_rng(0)
    maps = rng.normal(size=(8, 2, 192, 8, 8)).astype(np.float16)  # the last two blocks both read 192 x 8 x 8
    categories = ["A/x", "A/y"] * 4
    model = FineTunedTop(epochs=1, progress=False, pretrained=False).fit(maps, categories)
    # EfficientNet-Lite0: stem, 16 blocks, head; the last three stages (blocks 14, 15, head) train.
    assert model.first_stage_ == 15 and len(model.top_.stages) == 3
    model.save(tmp_path / "top.pt")
    loaded = FineTunedTop.load(tmp_path / "top.pt")
    assert loaded.first_stage_ == 15 and list(loaded.classes_) == ["A/x", "A/y"]
    np.testing.assert_allclose(loaded.transform(maps), model.transform(maps), atol=1e-5)

    one_block = FineTunedTop(first_stage=16, epochs=1, progress=False, pretrained=False).fit(maps, categories)
    one_block.save(tmp_path / "one.pt")
    assert len(FineTunedTop.load(tmp_path / "one.pt").top_.stages) == 2
    (tmp_path / "old.pt").write_bytes(b"a file of an older catalens")
    with pytest.raises(ModelFileError, match="old.pt"):
        FineTunedTop.load(tmp_path / "old.pt")


def test_top_block_training_length_grows_for_small_catalogs_within_a_cap():
    from catalens.indexer.training.top_blocks import epochs_for

    assert epochs_for(2640, 64) == 6  # grocery's whole train split: 41 steps a pass
    assert epochs_for(405, 64) == 12  # five photos per leaf: 6 steps a pass, 72 steps in all
    assert epochs_for(12, 64) == 30  # a tiny catalog: one step a pass, capped
