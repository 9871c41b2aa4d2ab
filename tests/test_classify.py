"""The few-shot hierarchical classifier, the network adapted to the catalog (finetune), and the classify CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

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
        # The best guess is still listed down to the leaf, below the threshold.
        assert [level.name for level in prediction.levels][:2] == ["T0", "M00"] and len(prediction.levels) == 3
        assert prediction.levels[1].confidence >= 0.6 > prediction.levels[2].confidence


def test_level_calibration_leaves_a_held_out_items_near_duplicates_out_of_its_second_fit(monkeypatch):
    # Bursts of four shots of one session: a second fit that kept a held-out shot's burst-mates
    # would answer it as surely as no shop photo is answered, and the confidences come out low.
    rng = np.random.default_rng(3)
    sessions, session_paths = _tree_data(rng, per_leaf=6, spread=0.8)
    support = np.repeat(sessions, 4, axis=0)
    support = np.abs(support + 0.01 * rng.normal(size=support.shape)).astype(np.float32)
    paths = np.repeat(session_paths, 4)
    burst = np.repeat(np.arange(len(sessions)), 4)
    seen: list[np.ndarray] = []
    fit = HierarchicalFewShotClassifier.fit

    def spy(self, features, categories):
        if not self.calibration_holdout:  # the second fit
            seen.append(np.asarray(features))
        return fit(self, features, categories)

    monkeypatch.setattr(HierarchicalFewShotClassifier, "fit", spy)

    def split_bursts(near_duplicate: float) -> int:
        seen.clear()
        HierarchicalFewShotClassifier(near_duplicate=near_duplicate).fit(support, paths)
        (inner,) = seen
        inside = (support[:, None, :] == inner[None, :, :]).all(axis=2).any(axis=1)
        kept = np.bincount(burst, weights=inside, minlength=len(sessions))
        assert 0 < inside.sum() < len(support)
        return int(((kept > 0) & (kept < 4)).sum())

    assert split_bursts(1.01) > 0  # holding single shots out splits their bursts
    assert split_bursts(0.8) == 0


def test_far_from_every_category_is_unknown():
    rng = np.random.default_rng(3)
    support, paths = _tree_data(rng, per_leaf=3)
    classifier = HierarchicalFewShotClassifier().fit(support, paths)
    outlier = np.zeros((1, support.shape[1]), dtype=np.float32)
    outlier[0, :3] = 1.0
    (prediction,) = classifier.predict_paths(outlier)
    assert prediction.category == UNKNOWN and len(prediction.levels) == 3  # the best guess, still shown


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


def test_neighbours_found_a_block_of_rows_at_a_time_are_those_of_all_rows_at_once(monkeypatch):
    # A 100k-item catalog's fit compares 20k held-out rows with every item: at once, 6.4 GB.
    import catalens.search.classifier as classifier_module

    rng = np.random.default_rng(3)
    support, paths = _tree_data(rng, per_leaf=6)
    queries = np.abs(support + 0.3 * rng.normal(size=support.shape)).astype(np.float32)
    classifier = HierarchicalFewShotClassifier().fit(support, paths)
    whole = classifier.nearest_support(queries, 5)
    monkeypatch.setattr(classifier_module, "_SIMILARITY_BUDGET", 3 * len(support))  # blocks of 3 rows
    blocked = classifier.nearest_support(queries, 5)
    np.testing.assert_array_equal(blocked[0], whole[0])
    np.testing.assert_allclose(blocked[1], whole[1], rtol=1e-6)


@pytest.mark.parametrize("leaves", [2, 8])
def test_linear_probabilities_are_scikit_learns(leaves):
    # The fitted linear model is kept as its coefficients; two classes are a sigmoid, more a softmax.
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(5)
    support, paths = _tree_data(rng, per_leaf=5)
    keep = np.isin(paths, sorted(set(paths))[:leaves])
    classifier = HierarchicalFewShotClassifier().fit(support[keep], paths[keep])
    rows = np.isin(classifier.support_leaf_, classifier.linear_leaves_)
    reference = LogisticRegression(C=classifier.C, max_iter=1000).fit(classifier.support_[rows],
                                                                       classifier.support_leaf_[rows])
    queries = classifier._embed(np.abs(rng.normal(size=(7, support.shape[1]))).astype(np.float32))
    np.testing.assert_allclose(classifier._linear_proba(queries), reference.predict_proba(queries), atol=1e-5)


def test_a_saved_classifier_answers_as_the_fitted_one(tmp_path):
    rng = np.random.default_rng(6)
    support, paths = _tree_data(rng, per_leaf=4)
    fitted = HierarchicalFewShotClassifier().fit(support, paths)
    fitted.fitted_on_ = {"generation": 3}
    loaded = HierarchicalFewShotClassifier.load(fitted.save(tmp_path / "classifier.pt")).attach_support(support)
    queries = np.abs(support + 0.4 * rng.normal(size=support.shape)).astype(np.float32)
    for mine, theirs in zip(fitted.leaf_proba(queries), loaded.leaf_proba(queries), strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7)
    assert [p.category for p in fitted.predict_paths(queries)] == [p.category for p in loaded.predict_paths(queries)]
    assert loaded.fitted_on_ == {"generation": 3}
    with pytest.raises(ValueError, match="support rows"):
        HierarchicalFewShotClassifier.load(tmp_path / "classifier.pt").attach_support(support[:-1])


def test_the_catalog_classifier_is_read_back_and_refitted_only_when_stale(tiny_index, tiny_catalog, monkeypatch):
    from catalens.datasets.catalog import load_catalog
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog
    from catalens.indexer.stores.backends import open_catalog
    from catalens.search import classify

    fits = []
    real_fit = classify.HierarchicalFewShotClassifier.fit
    monkeypatch.setattr(classify.HierarchicalFewShotClassifier, "fit",
                        lambda self, *args: fits.append(1) or real_fit(self, *args))

    def fresh_process(refit: bool = False):
        catalog = open_catalog(tiny_index)  # a new process's view: nothing cached in memory
        try:
            if refit:  # what the command that changed the catalog does at its end
                classify.CLASSIFIER.refit(catalog)
            return classify.fitted_classifier(catalog), classify.CLASSIFIER.status(catalog)
        finally:
            catalog.close()

    assert (tiny_index / "models" / classify.CLASSIFIER_FILE).is_file()  # stored by the index's refit
    first, state = fresh_process(refit=True)
    assert not fits and state.fresh and state.stored  # read back, not fitted
    again, _ = fresh_process()
    assert not fits and again.ids == first.ids
    np.testing.assert_allclose(again.classifier.support_, first.classifier.support_)
    # A file saved before a hyper-parameter existed is stale (not read with today's default): it
    # still answers, and the refit fits it again.
    real_load = HierarchicalFewShotClassifier.load

    def load_as_written_before(path, **overrides):
        loaded = real_load(path, **overrides)
        loaded.saved_params_ = {key: value for key, value in loaded.saved_params_.items() if key != "near_duplicate"}
        return loaded

    with monkeypatch.context() as patch:
        patch.setattr(classify.HierarchicalFewShotClassifier, "load", load_as_written_before)
        older, state = fresh_process()
        assert not fits and not state.fresh and "other settings" in state.reason and older.ids == first.ids
        fresh_process(refit=True)
    assert len(fits) == 1
    # The same keys and categories with other rows (an image indexed again) are another catalog.
    rows = np.ones((2, 3), np.float32)
    assert classify._catalog_stamp(np.arange(2), ["a", "b"], rows, {"deep": 1.0}) != classify._catalog_stamp(
        np.arange(2), ["a", "b"], rows * 2, {"deep": 1.0})
    # A catalog write (one item fewer) makes the stored one stale: a reader gets it without the
    # removed item's row, and the refit fits it again.
    index_catalog(load_catalog(tiny_catalog)[1:], tiny_index, IndexConfig(), progress=False)
    stale, state = fresh_process()
    assert len(fits) == 1 and not state.fresh and len(stale.ids) == len(first.ids) - 1
    changed, state = fresh_process(refit=True)
    assert len(fits) == 2 and state.fresh and changed.ids == stale.ids


def test_predict_before_fit_fails_clearly():
    from catalens.indexer.estimator import NotFittedError

    with pytest.raises(NotFittedError):
        HierarchicalFewShotClassifier().predict(np.ones((1, 4), dtype=np.float32))


def test_result_json_matches_the_contract():
    result = ClassifyResult("q.jpg", "A/B", [LevelPrediction("A", 0.97), LevelPrediction("B", 0.61)], ["x", "y"])
    assert result.to_json() == {
        "query": "q.jpg", "category": "A/B",
        "levels": [{"name": "A", "confidence": 0.97}, {"name": "B", "confidence": 0.61}], "neighbours": ["x", "y"],
        # Added beside the contract (issue 37): the best guess at the leaf, and how deep it is sure.
        "guess": "A/B", "sure_depth": 2, "sure_at": 0.9,
    }
    unsure = ClassifyResult("q.jpg", "A", [LevelPrediction("A", 0.97), LevelPrediction("B", 0.61)], ["x"])
    assert (unsure.guess, unsure.sure_depth) == ("A/B", 1)
    assert ClassifyResult("q.jpg", "unknown", [LevelPrediction("A", 0.5)]).sure_depth == 0
    assert ClassifyResult("bad.jpg", error="cannot decode").to_json() == {"query": "bad.jpg", "error": "cannot decode"}


@pytest.fixture()
def tiny_index(tiny_catalog, tmp_path):
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog
    from tests.conftest import refit_index

    index_catalog(tiny_catalog, tmp_path / "index", IndexConfig(), progress=False)
    refit_index(tmp_path / "index")
    return tmp_path / "index"


def test_classify_cli_json_lines_and_unreadable_image(tiny_index, tiny_catalog, tmp_path, capsys):
    from catalens.api.cli import main

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    query = sorted((tiny_catalog / "Dairy" / "Milk").glob("*.jpg"))[0]
    assert main(["classify", str(query), str(bad), "--index", str(tiny_index), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["query"] == str(query)
    assert set(lines[0]) == {"query", "category", "levels", "neighbours", "guess", "sure_depth", "sure_at"}
    assert lines[0]["category"].startswith("Dairy/Milk")  # an indexed image finds its own category
    # The best guess at every level down to the leaf, confidences in [0, 1] never growing with depth;
    # the category is the part of it that reaches the threshold.
    levels = lines[0]["levels"]
    guess = "/".join(level["name"] for level in levels)
    assert guess in {"Dairy/Milk", "Dairy/Yoghurt", "Fruit/Apple"}
    confidences = [level["confidence"] for level in levels]
    assert all(0 <= c <= 1 for c in confidences) and confidences == sorted(confidences, reverse=True)
    assert (guess + "/").startswith(lines[0]["category"] + "/")
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
    from catalens.indexer.stores.backends import open_catalog
    from catalens.search.classify import classify

    index = open_catalog(grocery_index)
    sample = val_photos[::12]
    results = classify(index, [photo.path for photo in sample])
    # The best guess at the top level (levels always reach the leaf), and the confident category
    # right where it stops (a prefix of the photo's path) at least 90% of the time.
    top = np.mean([r.levels[0].name == p.top for r, p in zip(results, sample, strict=True)])
    assert top >= 0.85
    answered = [(r, p) for r, p in zip(results, sample, strict=True) if r.category != "unknown"]
    assert answered and np.mean([(p.category + "/").startswith(r.category + "/") for r, p in answered]) >= 0.9


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
    from catalens.indexer.stores.backends import open_catalog
    from catalens.search.classify import classify, fitted_classifier

    index = open_catalog(tiny_index)
    assert index.dims()["colour"] == 192
    fitted = fitted_classifier(index)
    assert fitted.weights == {"deep": 1.0, "colour": 0.6}
    assert fitted.classifier.support_.shape[1] == index.dims()["deep"] + 192
    query = sorted((tiny_catalog / "Dairy" / "Yoghurt").glob("*.jpg"))[0]
    assert classify(index, [query])[0].category.startswith("Dairy/Yoghurt")


def test_finetune_adapts_the_network_and_search_new_items_and_classify_use_it(tiny_index, tiny_catalog, capsys,
                                                                              monkeypatch):
    from catalens.api.cli import main
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog
    from catalens.indexer.stores.backends import open_catalog
    from catalens.indexer.training import adaptation
    from catalens.search.classify import classify, fitted_classifier
    from catalens.search.engine import SearchEngine
    from tests.conftest import draw_product

    monkeypatch.setattr(adaptation, "MIN_GAIN", -1.0)  # whatever the held-out slice says: this checks the plumbing
    assert main(["finetune", "--index", str(tiny_index), "--steps", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == 12 and report["products"] == 3 and report["kept"] and report["steps"] == 4
    assert report["held_out_kind"] == "views" and report["held_out"] > 0  # three products: too few to hold photos out
    assert 0 <= report["frozen_accuracy"] <= 1 and 0 <= report["adapted_accuracy"] <= 1
    index = open_catalog(tiny_index)
    assert "deep_ft" in index.config.features and index.vectors("deep_ft").ntotal == 12
    assert SearchEngine(index).weights() == {"colour": 0.3, "deep_ft": 1.0, "sift": 0.2}  # it stands in for deep in search
    index.close()

    draw_product(tiny_catalog / "Fruit/Apple/new.jpg", seed=77)
    added = index_catalog(tiny_catalog, tiny_index, IndexConfig(), progress=False)
    assert added.added == 1 and not added.failures
    index = open_catalog(tiny_index)
    assert len(index.items.row_keys("deep_ft")) == 13
    fitted = fitted_classifier(index)
    assert fitted.weights == {"deep_ft": 1.0, "colour": 0.6}  # ...and in classification
    query = sorted((tiny_catalog / "Dairy" / "Milk").glob("*.jpg"))[0]
    assert classify(index, [query])[0].category.startswith("Dairy/Milk")
    assert SearchEngine(index).search([query], k=1, mode="deep_ft")[0].results[0].id.endswith(query.name)
    # locate embeds its windows from one view: the same space as the two-view rows.
    adapted = index.feature("deep_ft")
    with Image.open(query) as photo:
        prepared = [adapted.preparer(photo.convert("RGB"))]
    one, both = adapted.finish_one_view(prepared), adapted.finish(prepared)
    assert one.shape == both.shape == (1, adapted.dim) and np.linalg.norm(one) == pytest.approx(1.0, abs=1e-4)
    assert float(one[0] @ both[0]) > 0.8 and adapted.finish_one_view([]).shape == (0, adapted.dim)
    # ...and embeds square windows from one network pass per window side: each window of a photo
    # of two products side by side is nearer the crop of its own half than of the other.
    apple = sorted((tiny_catalog / "Fruit" / "Apple").glob("*.jpg"))[0]
    halves = [Image.open(path).convert("RGB").resize((256, 256)) for path in (query, apple)]
    pair = Image.new("RGB", (512, 256))
    for i, half in enumerate(halves):
        pair.paste(half, (256 * i, 0))
    from_maps = adapted.window_rows(pair, [(0, 0, 256, 256), (256, 0, 512, 256)])
    from_crops = adapted.finish_one_view([adapted.preparer(half) for half in halves])
    similarity = from_maps @ from_crops.T
    assert from_maps.shape == (2, adapted.dim) and np.allclose(np.linalg.norm(from_maps, axis=1), 1.0, atol=1e-4)
    assert similarity[0, 0] > similarity[0, 1] and similarity[1, 1] > similarity[1, 0], similarity
    assert adapted.window_rows(pair, []).shape == (0, adapted.dim)
    # locate's windows go through them (and through crops when told not to).
    from catalens.search.locate import LocateSettings, locate

    calls = []
    monkeypatch.setattr(type(adapted), "window_rows", lambda self, image, boxes: calls.append(len(boxes)) or
                        from_maps[[i % 2 for i in range(len(boxes))]])
    engine = SearchEngine(index)
    assert locate(engine, [pair])[0].error is None and calls and calls[0] > 2
    calls.clear()
    assert locate(engine, [pair], settings=LocateSettings(window_maps=False))[0].error is None and not calls
    index.close()


def test_finetune_that_does_not_help_is_not_kept_and_removes_an_earlier_one(tiny_index, capsys, monkeypatch):
    from catalens.api.cli import main
    from catalens.indexer.features.deep_ft import MODEL_FILE
    from catalens.indexer.stores.backends import open_catalog
    from catalens.indexer.training import adaptation

    monkeypatch.setattr(adaptation, "MIN_GAIN", -1.0)
    assert main(["finetune", "--index", str(tiny_index), "--steps", "2", "--json"]) == 0
    monkeypatch.setattr(adaptation, "MIN_GAIN", 2.0)  # no accuracy can gain two whole units
    assert main(["finetune", "--index", str(tiny_index), "--steps", "2"]) == 0
    assert "not kept" in capsys.readouterr().out
    index = open_catalog(tiny_index)
    try:
        assert "deep_ft" not in index.config.features and not index.items.row_keys("deep_ft")
        assert not (index.models_dir / MODEL_FILE).exists()
        assert index.meta["adaptation"]["kept"] is False
    finally:
        index.close()


def test_adapted_top_loads_as_it_was_saved_and_an_older_file_says_what_to_do(tmp_path):
    from catalens.indexer.estimator import ModelFileError
    from catalens.indexer.features.adapted_model import AdaptedTop

    rng = np.random.default_rng(0)
    maps = rng.normal(size=(8, 192, 8, 8)).astype(np.float16)  # what the last two blocks of lite0 read
    model = AdaptedTop(steps=2, progress=False, pretrained=False).fit(maps, ["A/x", "A/y"] * 4)
    # EfficientNet-Lite0: stem, 16 blocks, head; the last three stages (blocks 14, 15, head) train.
    assert model.first_stage_ == 15 and len(model.top_.stages) == 3 and len(model.loss_history_) == 2
    model.save(tmp_path / "top.pt")
    loaded = AdaptedTop.load(tmp_path / "top.pt")
    assert loaded.first_stage_ == 15 and list(loaded.classes_) == ["A/x", "A/y"]
    pairs = maps.reshape(4, 2, 192, 8, 8)
    np.testing.assert_allclose(loaded.transform(pairs), model.transform(pairs), atol=1e-5)
    (tmp_path / "old.pt").write_bytes(b"a file of an older catalens")
    with pytest.raises(ModelFileError, match="old.pt"):
        AdaptedTop.load(tmp_path / "old.pt")


def test_augmented_views_are_the_same_for_the_same_image_and_packshots_are_pasted():
    from PIL import Image

    from catalens.indexer.backbones import get_backbone
    from catalens.indexer.features.deep import DeepPreparer
    from catalens.indexer.training.adaptation import AugmentedViews, is_packshot
    from tests.conftest import textured_label

    packshot = Image.new("RGB", (300, 300), (255, 255, 255))
    packshot.paste(textured_label(3, size=160), (70, 70))
    photo = Image.fromarray(np.random.default_rng(4).integers(0, 255, (320, 320, 3), dtype=np.uint8))  # a busy scene
    assert is_packshot(packshot) and not is_packshot(photo)
    views = AugmentedViews(DeepPreparer(get_backbone("efficientnet_lite0")), 3, 5, seed=0, cutouts=[], photos=[])
    (clean, first), (_, again) = views(packshot), views(packshot)
    assert first.shape == (5, 256, 256, 3) and first.dtype == np.uint8 and np.array_equal(first, again)
    # The clean crop exactly as indexing prepares it, and its mirror image.
    np.testing.assert_allclose(clean[0], views.preparer(packshot), atol=2e-3)
    np.testing.assert_allclose(clean[1], views.preparer(packshot)[:, :, ::-1], atol=2e-3)
    assert views(photo)[1].shape[0] == 3
    # Pasted on backgrounds: the views' borders are no longer the packshot's white.
    assert np.mean([v[:8].mean() < 235 for v in first]) >= 0.6


def test_adaptation_trains_longer_for_larger_catalogs_within_a_cap():
    from catalens.indexer.features.adapted_model import steps_for

    assert steps_for(81) == 203 and steps_for(2721) == 308 and steps_for(1_000_000) == 600
