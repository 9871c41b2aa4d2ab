"""What is fitted on the catalog (classifier, match calibration): fitted by whoever changed the
catalog or by the server in the background, never inside a search; stale fits serve meanwhile."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from catalens.search.calibration import MODEL_FILE
from catalens.search.classify import CLASSIFIER_FILE

KEY = "test-key-123-456-789"


@pytest.fixture()
def refitted_index(tiny_catalog, tmp_path) -> Path:
    """The tiny catalog indexed as ``catalens index`` does: its fits stored at the end."""
    from catalens.api.service import index
    from catalens.indexer.config import IndexConfig

    index(tiny_catalog, tmp_path / "index", IndexConfig(num_workers=0), progress=False)
    return tmp_path / "index"


def _no_fitting(monkeypatch) -> None:
    """Any fit of the classifier or the calibration fails the test."""
    from catalens.search import calibration, classify

    def refuse(*args, **kwargs):
        raise AssertionError("fitted inside a search")

    monkeypatch.setattr(calibration, "fit_match_calibration", refuse)
    monkeypatch.setattr(classify.HierarchicalFewShotClassifier, "fit", refuse)


def test_index_stores_fresh_fits_so_the_first_search_fits_nothing(refitted_index, tiny_catalog, monkeypatch):
    from catalens.api.service import CatalogService

    models = refitted_index / "models"
    assert (models / MODEL_FILE).is_file() and (models / CLASSIFIER_FILE).is_file()
    _no_fitting(monkeypatch)
    service = CatalogService.open(refitted_index)  # a new process's view
    try:
        (result,) = service.search([tiny_catalog / "Dairy/Yoghurt/item01.jpg"], k=3)
        (classified,) = service.classify([tiny_catalog / "Dairy/Yoghurt/item01.jpg"])
        fitted = service.info()["fitted"]
    finally:
        service.close()
    assert result.calibrated and all(hit.confidence is not None for hit in result.results)
    assert classified.error is None and classified.levels
    assert all(state["present"] and state["fresh"] and state["stored"] for state in fitted.values())


def test_a_search_after_a_write_does_not_fit_and_uses_the_last_fit_marked_stale(refitted_index, tiny_catalog,
                                                                                 monkeypatch):
    from catalens.api.service import CatalogService

    service = CatalogService.open(refitted_index)
    try:
        before = service.engine.calibrator()
        removed = [record.id for record in list(service.catalog.items.records().values())[:4]]
        service.remove(removed)  # a third of the catalog: beyond max_stale
        _no_fitting(monkeypatch)
        (result,) = service.search([tiny_catalog / "Dairy/Milk/item00.jpg"], k=3)
        (classified,) = service.classify([tiny_catalog / "Dairy/Milk/item00.jpg"])
        info = service.info()
        after = service.engine.calibrator()
    finally:
        service.close()
    assert after is before  # the last fit serves on
    assert result.calibrated and all(hit.confidence is not None for hit in result.results)
    assert classified.error is None and not set(classified.neighbours) & set(removed)
    assert info["calibration"]["stale"] and "changed" in info["calibration"]["reason"]
    assert info["fitted"]["classifier"]["stale"] and info["fitted"]["match calibration"]["stale"]


def test_without_any_stored_fit_a_search_answers_without_confidence_and_says_so_once(tiny_catalog, tmp_path,
                                                                                      monkeypatch, caplog):
    from catalens.api.service import CatalogService, ModelMissingError
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog

    index_catalog(tiny_catalog, tmp_path / "index", IndexConfig(num_workers=0), progress=False)  # no refit: an older index
    _no_fitting(monkeypatch)
    query = tiny_catalog / "Fruit/Apple/item02.jpg"
    service = CatalogService.open(tmp_path / "index")
    try:
        with caplog.at_level(logging.WARNING):
            first, second = service.search([query, query], k=3)
        with pytest.raises(ModelMissingError, match="catalens calibrate"):
            service.classify([query])
        info = service.info()
    finally:
        service.close()
    assert first.results and not first.calibrated and all(hit.confidence is None for hit in first.results)
    assert "match" not in first.to_json()
    assert sum("match calibration" in record.message for record in caplog.records) == 1
    assert not info["calibration"]["present"] and "no match calibration" in info["calibration"]["reason"]
    assert not [name for name in (MODEL_FILE, CLASSIFIER_FILE) if (tmp_path / "index" / "models" / name).exists()]


def test_index_remove_and_finetune_commands_refit_at_their_end(tiny_catalog, tmp_path, monkeypatch, capsys):
    from catalens.api.cli import main
    from catalens.api.service import CatalogService
    from catalens.search.refit import fitted_status

    index = tmp_path / "index"
    assert main(["index", str(tiny_catalog), "--index", str(index), "--quiet"]) == 0

    def states():
        service = CatalogService.open(index)
        try:
            return fitted_status(service.catalog)
        finally:
            service.close()

    assert all(state.fresh and state.stored for state in states().values())
    first = index.joinpath("models", CLASSIFIER_FILE).stat().st_mtime_ns
    assert main(["remove", "Dairy/Milk/item00.jpg", "Dairy/Milk/item03.jpg", "Dairy/Milk/item06.jpg", "Fruit/Apple/item02.jpg",
                 "--index", str(index), "--quiet"]) == 0
    assert all(state.fresh for state in states().values())
    assert index.joinpath("models", CLASSIFIER_FILE).stat().st_mtime_ns != first

    class Report:
        def to_json(self):
            return {"kept": False}

    def finetune_that_writes(self, **options):
        self.catalog.remove(["Dairy/Milk/item09.jpg"])
        return Report()

    monkeypatch.setattr(CatalogService, "finetune", finetune_that_writes)
    assert main(["finetune", "--index", str(index), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"kept": False}
    assert all(state.fresh for state in states().values())


def test_every_finetune_refits_the_match_calibration_it_changed_the_evidence_of(refitted_index, monkeypatch, capsys):
    """A second finetune replaces every deep_ft row and adds or removes no item; one that keeps no
    network gives fused search back to deep. The calibration fitted before either reads other
    scores than search now does: stale, and refitted at the command's end."""
    from catalens.api.cli import main
    from catalens.indexer.stores.backends import open_catalog
    from catalens.indexer.training import adaptation
    from catalens.search.calibration import CALIBRATION, MatchCalibrator, features_read

    def calibration() -> MatchCalibrator:
        return MatchCalibrator.load(refitted_index / "models" / MODEL_FILE)

    fits = [calibration().fitted_at_]
    # Kept (whatever two steps find), kept again, then not kept (no accuracy gains two whole units).
    for run, min_gain in enumerate((-1.0, -1.0, 2.0)):
        monkeypatch.setattr(adaptation, "MIN_GAIN", min_gain)
        catalog = open_catalog(refitted_index)
        try:
            before = features_read(catalog)
        finally:
            catalog.close()
        assert main(["finetune", "--index", str(refitted_index), "--steps", "2", "--json"]) == 0, run
        capsys.readouterr()
        catalog = open_catalog(refitted_index)
        try:
            assert features_read(catalog) != before
            assert calibration().features_read_ == features_read(catalog)
            assert CALIBRATION.status(catalog).fresh
        finally:
            catalog.close()
        fits.append(calibration().fitted_at_)
    assert len(set(fits)) == len(fits)  # one fit a finetune

    # As an older catalens wrote it: no record of what it read, so it cannot vouch for the network.
    model = calibration()
    del model.features_read_
    model._state = lambda: {name: getattr(model, name) for name in (
        "modes_", "coef_", "intercept_", "threshold_", "precision_", "coverage_", "queries_", "catalog_keys_",
        "fitted_at_")}
    model.save(refitted_index / "models" / MODEL_FILE)
    catalog = open_catalog(refitted_index)
    try:
        state = CALIBRATION.status(catalog)
        assert not state.fresh and "older catalens" in state.reason
    finally:
        catalog.close()


def test_the_calibration_digest_reads_numbers_as_the_index_json_gives_them_back(refitted_index):
    """The finetune run is digested in the process that fitted it and again by every later reader
    of the index's JSON: a numpy number must not make the calibration stale for good."""
    import numpy as np

    from catalens.indexer.stores.backends import open_catalog
    from catalens.search.calibration import features_read

    catalog = open_catalog(refitted_index, read_only=True)
    try:
        catalog.meta["adaptation"] = {"steps": np.int64(2), "adapted_accuracy": np.float32(0.5), "kept": np.bool_(True)}
        just_computed = features_read(catalog)
        catalog.meta["adaptation"] = json.loads('{"steps": 2, "adapted_accuracy": 0.5, "kept": true}')
        assert features_read(catalog) == just_computed
        catalog.meta["adaptation"]["steps"] = 3
        assert features_read(catalog) != just_computed
    finally:
        catalog.close()


def test_the_server_refits_in_the_background_after_a_write_and_serves_the_new_fit(refitted_index, tiny_catalog,
                                                                                   monkeypatch):
    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app
    from catalens.search import calibration

    fitted_on = []
    real_fit = calibration.fit_match_calibration

    def recording_fit(*args, **kwargs):
        fitted_on.append(threading.current_thread().name)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(calibration, "fit_match_calibration", recording_fit)
    app = create_app(refitted_index, api_key=KEY, refit_delay=0.5)
    state = app.state.catalens
    with TestClient(app) as client:
        before = state.service.engine.calibrator()
        for item_id in ("Dairy/Milk/item00.jpg", "Dairy/Milk/item03.jpg", "Fruit/Apple/item02.jpg", "Fruit/Apple/item05.jpg"):
            assert client.delete(f"/items/{item_id}", headers={"X-API-Key": KEY}).status_code == 200
        assert not fitted_on  # no request fitted
        with open(tiny_catalog / "Dairy/Yoghurt/item01.jpg", "rb") as photo:
            during = client.post("/search", files={"image": ("q.jpg", photo, "image/jpeg")}, data={"k": "3"}).json()
        assert during["results"] and during["results"][0].get("confidence") is not None
        assert state.refit.wait(timeout=300)
        stats = client.get("/stats").json()
        after = state.service.engine.calibrator()
    assert fitted_on and all(name == "catalens-refit" for name in fitted_on)
    assert after is not before and after.changed_fraction(after.catalog_keys_) == 0
    assert len(after.catalog_keys_) == 8
    assert all(model["fresh"] and model["stored"] for model in stats["fitted"].values())


def test_a_read_only_server_refits_in_memory_and_never_writes_a_model_file(tiny_catalog, tmp_path):
    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog

    index = tmp_path / "index"
    index_catalog(tiny_catalog, index, IndexConfig(num_workers=0), progress=False)  # nothing fitted yet
    app = create_app(index, read_only=True)
    with TestClient(app) as client:
        assert app.state.catalens.refit.wait(timeout=300)  # started at once: the index had no fits
        stats = client.get("/stats").json()
        with open(tiny_catalog / "Dairy/Yoghurt/item01.jpg", "rb") as photo:
            body = client.post("/search", files={"image": ("q.jpg", photo, "image/jpeg")}, data={"k": "3"}).json()
    assert all(model["present"] and model["fresh"] and not model["stored"] for model in stats["fitted"].values())
    assert body["results"][0]["confidence"] is not None
    written = [path.name for path in (index / "models").iterdir()
               if path.name.startswith((MODEL_FILE, CLASSIFIER_FILE)) or path.name.endswith(".tmp")]
    assert not written


def test_a_refit_into_an_unwritable_folder_keeps_the_fit_in_memory(tiny_catalog, tmp_path, monkeypatch):
    from catalens.api.service import CatalogService
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.estimator import Estimator
    from catalens.indexer.pipeline import index_catalog

    index_catalog(tiny_catalog, tmp_path / "index", IndexConfig(num_workers=0), progress=False)

    def unwritable(self, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Estimator, "save", unwritable)
    service = CatalogService.open(tmp_path / "index")
    try:
        states = service.refit()
        (result,) = service.search([tiny_catalog / "Dairy/Yoghurt/item01.jpg"], k=3)
    finally:
        service.close()
    assert all(state.model is not None and state.fresh and not state.stored for state in states)
    assert result.calibrated
    assert not [name for name in (MODEL_FILE, CLASSIFIER_FILE) if (tmp_path / "index" / "models" / name).exists()]
