"""Calibrated match confidence: the model (monotone, thresholds, persistence) and the search contract."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from catalens.search.calibration import EVIDENCE, MODEL_FILE, MatchCalibrator, hit_evidence


def _evidence(rng, n=600):
    """Evidence rows where right answers have higher score, margin and inliers; agreement is noise
    that, by chance, may lean the wrong way."""
    right = rng.random(n) < 0.5
    rows = np.column_stack([
        0.5 + 0.2 * right + 0.1 * rng.normal(size=n),
        0.05 + 0.1 * right + 0.05 * rng.normal(size=n),
        np.clip(0.5 * right + 0.3 * rng.random(n), 0, 1),
        rng.random(n),
        np.log(np.clip(0.3 + 0.4 * right + 0.2 * rng.random(n), 1e-4, 1)),
    ])
    is_top = np.arange(n) % 2 == 0
    return rows, right, is_top


def test_confidence_is_a_probability_that_never_falls_when_evidence_grows():
    rng = np.random.default_rng(0)
    model = MatchCalibrator().fit({"fused": _evidence(rng)}, np.arange(50))
    assert (model.coef_ >= 0).all()
    base = rng.random((200, len(EVIDENCE)))
    confidence = model.predict_proba("fused", base)
    assert ((confidence >= 0) & (confidence <= 1)).all()
    for feature in range(len(EVIDENCE)):
        more = base.copy()
        more[:, feature] += 0.3
        assert (model.predict_proba("fused", more) >= confidence - 1e-12).all()


def test_default_threshold_reaches_the_target_precision_on_the_calibration_queries():
    rng = np.random.default_rng(1)
    rows, right, is_top = _evidence(rng)
    model = MatchCalibrator(target_precision=0.9).fit({"deep": (rows, right, is_top)}, np.arange(10))
    threshold = model.threshold("deep")
    matched = model.predict_proba("deep", rows[is_top]) >= threshold
    assert matched.any() and right[is_top][matched].mean() >= 0.9
    (summary,) = model.summary()
    assert summary["mode"] == "deep" and summary["precision"] >= 0.9 and 0 < summary["coverage"] <= 1


def test_a_mode_with_only_right_answers_gets_their_rate_and_no_error():
    rows = np.random.default_rng(2).random((40, len(EVIDENCE)))
    model = MatchCalibrator().fit({"colour": (rows, np.ones(40, bool), np.ones(40, bool))}, np.arange(5))
    confidence = model.predict_proba("colour", rows)
    assert np.allclose(confidence, confidence[0]) and 0.9 < confidence[0] < 1


def test_stored_model_loads_the_same_and_says_how_much_the_catalog_changed(tmp_path):
    rng = np.random.default_rng(3)
    model = MatchCalibrator().fit({"fused": _evidence(rng), "local": _evidence(rng)}, np.arange(100))
    loaded = MatchCalibrator.load(model.save(tmp_path / MODEL_FILE))
    rows = rng.random((20, len(EVIDENCE)))
    assert np.allclose(loaded.predict_proba("local", rows), model.predict_proba("local", rows))
    assert loaded.threshold("fused") == model.threshold("fused")
    assert loaded.changed_fraction(np.arange(100)) == 0
    assert loaded.changed_fraction(np.arange(10, 105)) == pytest.approx(15 / 100)  # 10 removed, 5 added
    with pytest.raises(KeyError, match="not calibrated"):
        loaded.predict_proba("deep", rows)


def test_evidence_reads_margin_to_the_next_product_and_neighbour_agreement():
    rows = hit_evidence("deep", np.array([0.9, 0.8]), ["a", "b"], np.zeros(2),
                        np.array([0.9, 0.85, 0.8]), ["a", "a", "b"], inlier_cap=30)
    score, margin, inliers, agreement, category = rows[0]
    assert score == pytest.approx(0.9) and margin == pytest.approx(0.1) and inliers == 0
    assert agreement == pytest.approx(2 / 3) and category == 0  # no classifier: log(1)
    assert rows[1][1] == pytest.approx(0.8 - 0.9)  # behind another product: a negative margin


def test_search_json_carries_confidence_and_a_match_only_above_the_threshold(tiny_catalog, tmp_path, capsys):
    from catalens.api.cli import main
    from catalens.api.service import CatalogService
    from catalens.api.service import index as index_and_refit
    from catalens.indexer.config import IndexConfig

    index = tmp_path / "index"
    index_and_refit(tiny_catalog, index, IndexConfig(num_workers=0), progress=False)
    assert (index / "models" / MODEL_FILE).is_file()  # fitted at the end of indexing, stored with it
    query = tiny_catalog / "Dairy/Yoghurt/item01.jpg"
    assert main(["search", str(query), "--index", str(index), "--k", "4", "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert "match" in line and all(0 <= hit["confidence"] <= 1 for hit in line["results"])

    service = CatalogService.open(index)
    try:
        (never,) = service.search([query], match_threshold=1.0)
        (always,) = service.search([query], match_threshold=0.0)
        threshold = service.engine.calibrator().threshold("fused")
        (default,) = service.search([query])
        info = service.info()["calibration"]
    finally:
        service.close()
    assert never.match is None and always.match == always.results[0].id
    assert default.match == (default.results[0].id if default.results[0].confidence >= threshold else None)
    assert info["stored"] and not info["stale"] and {row["mode"] for row in info["modes"]} >= {"fused", "deep"}

    assert main(["search", str(query), "--index", str(index), "--k", "3"]) == 0
    table = capsys.readouterr().out
    assert "confidence" in table and ("no confident match" in table or "match " in table)


def test_a_catalog_changed_beyond_max_stale_is_stale_until_the_refit(tiny_catalog, tmp_path, capsys):
    from catalens.api.service import CatalogService
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog

    index = tmp_path / "index"
    index_catalog(tiny_catalog, index, IndexConfig(num_workers=0), progress=False)
    service = CatalogService.open(index)
    try:
        service.calibrate(max_queries=20)
        before = service.engine.calibrator()
        removed = [record.id for record in list(service.catalog.items.records().values())[:4]]
        service.remove(removed)  # 4 of 12: a third of the catalog
        assert service.info()["calibration"]["stale"]
        during = service.engine.calibrator()  # searches keep the last fit meanwhile
        service.refit()  # what remove does at its end
        after = service.engine.calibrator()
        assert not service.info()["calibration"]["stale"]
    finally:
        service.close()
    assert during is before
    assert after is not before and after.changed_fraction(after.catalog_keys_) == 0


def test_calibrate_command_prints_each_mode(tiny_catalog, tmp_path, capsys):
    from catalens.api.cli import main
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog

    index = tmp_path / "index"
    index_catalog(tiny_catalog, index, IndexConfig(num_workers=0), progress=False)
    assert main(["calibrate", "--index", str(index), "--queries", "12", "--json"]) == 0
    modes = {row["mode"] for row in json.loads(capsys.readouterr().out)["modes"]}
    assert {"fused", "local", "deep"} <= modes
    copy = tmp_path / "copy"
    shutil.copytree(index, copy)
    assert (copy / "models" / MODEL_FILE).is_file()
