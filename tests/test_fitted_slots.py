"""What a feature fits on the catalog (the visual vocabulary, the autoencoder, the adapted network)
goes through its ``FittedSlot`` like the classifier and the calibration: read, judged, fitted and
stored one way; ``catalens check`` rebuilds what a slot can fit without knowing the feature."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from catalens.indexer.estimator import ModelFileError
from catalens.indexer.fitted import FittedSlot

# --- the slot's contract, on a stand-in catalog


class StandIn:
    """What a slot asks of a catalog: where its models live, and which state it is in."""

    def __init__(self, folder: Path):
        self.location, self.models_dir, self.generation = str(folder), folder, 0


def _save(model: dict, path: Path) -> None:
    path.write_text(json.dumps(model))


def _load(catalog: StandIn, path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{path}: not a model ({error.msg}); fit it again") from None


def _slot(fit=None, fresh=lambda model, catalog: None, fitted_by=None) -> FittedSlot:
    return FittedSlot(name="thing", model_file="thing.json", load=_load, fit=fit, fresh=fresh, save=_save,
                      fitted_by=fitted_by)


def test_a_fit_that_returns_none_removes_the_stored_model_and_holds_none(tmp_path):
    catalog = StandIn(tmp_path)
    slot = _slot(fit=lambda catalog, progress: {"n": 1})
    assert slot.refit(catalog).stored and slot.path(catalog).is_file()
    state = slot.refit(catalog, force=True, fit=lambda catalog, progress: None)
    assert state.model is None and not slot.path(catalog).exists()
    assert "no thing is stored" in state.reason


def test_a_slot_without_its_own_fit_names_the_command_that_fits_it(tmp_path):
    catalog = StandIn(tmp_path)
    slot = _slot(fitted_by="catalens train-thing")
    state = slot.refit(catalog)
    assert state.model is None and "catalens train-thing" in state.reason
    stored = slot.refit(catalog, force=True, fit=lambda catalog, progress: {"n": 2})
    assert stored.model == {"n": 2} and stored.stored and stored.fresh


def test_a_callers_fit_and_commit_report_their_failures_to_the_caller(tmp_path):
    catalog = StandIn(tmp_path)
    slot = _slot(fitted_by="catalens train-thing")

    def refuse(catalog, progress):
        raise ValueError("too few items")

    with pytest.raises(ValueError, match="too few items"):
        slot.refit(catalog, force=True, fit=refuse)

    def full(model, path):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        slot.refit(catalog, force=True, fit=lambda catalog, progress: {"n": 3}, save=full)
    assert slot.status(catalog).model is None and not slot.path(catalog).exists()  # nothing held, nothing stored
    committed = []
    state = slot.refit(catalog, force=True, fit=lambda catalog, progress: {"n": 4},
                       save=lambda model, path: committed.append(model) or _save(model, path))
    assert committed == [{"n": 4}] and state.stored and _load(catalog, slot.path(catalog)) == {"n": 4}


def test_a_stored_file_that_does_not_load_is_a_model_file_error_for_whoever_requires_it(tmp_path):
    catalog = StandIn(tmp_path)
    slot = _slot(fitted_by="catalens train-thing")
    missing = LookupError("none yet")
    with pytest.raises(LookupError):
        slot.require(catalog, missing)
    slot.path(catalog).write_text("{damaged")
    state = slot.status(catalog)
    assert state.unreadable and state.model is None and "not a model" in state.reason
    with pytest.raises(ModelFileError, match="thing.json: not a model"):
        slot.require(catalog, missing)


def test_a_reader_that_does_not_judge_never_asks_whether_the_model_is_fresh(tmp_path):
    catalog = StandIn(tmp_path)
    asked = []
    slot = _slot(fit=lambda catalog, progress: {"n": 5}, fresh=lambda model, catalog: asked.append(1) or None)
    slot.refit(catalog)
    asked.clear()
    catalog.generation += 1
    assert slot.require(catalog, LookupError()) == {"n": 5} and not asked
    assert slot.status(catalog).fresh and asked == [1]


# --- the features' slots, on a generated index


@pytest.fixture()
def index(synthetic_index, tmp_path) -> Path:
    """A copy of the session's generated index (deep, colour, sift), to change."""
    return Path(shutil.copytree(synthetic_index[0], tmp_path / "index"))


def test_a_vocabulary_the_catalog_outgrew_is_stale_and_refit_quantises_the_words_again(index):
    from catalens.indexer.features.sift import VOCABULARY
    from catalens.indexer.stores.backends import open_catalog

    catalog = open_catalog(index)
    try:
        state = VOCABULARY.status(catalog)
        assert state.fresh and state.stored
        vocabulary = state.model
        vocabulary.fitted_on_ = 4  # fitted on four of the nine images: the catalog has doubled since
        vocabulary.save(VOCABULARY.path(catalog))
    finally:
        catalog.close()
    catalog = open_catalog(index)  # another process's view
    try:
        state = VOCABULARY.status(catalog)
        assert not state.fresh and "times" in state.reason and state.model.id_ == vocabulary.id_
        catalog.refresh(np.zeros(0, np.int64), np.zeros(0, np.int64))  # what every indexing run ends with
        refitted = VOCABULARY.status(catalog)
        assert refitted.fresh and refitted.stored and refitted.model.id_ != vocabulary.id_
        assert refitted.model.fitted_on_ == 9
        assert not catalog.words("sift").stale(refitted.model.id_)
    finally:
        catalog.close()


def test_a_vocabulary_of_another_size_than_configured_is_stale(index):
    from catalens.indexer.features.sift import VOCABULARY
    from catalens.indexer.stores.backends import open_catalog

    catalog = open_catalog(index)
    try:
        catalog.config.feature_options = {"sift": {"vocab_size": 64}}
        state = VOCABULARY.status(catalog)
        assert not state.fresh and "asks 64" in state.reason
        assert VOCABULARY.refit(catalog).model.size == 64
    finally:
        catalog.close()


def test_check_fits_a_damaged_vocabulary_again_and_requantises_without_naming_the_feature(index):
    from catalens.indexer import integrity
    from catalens.indexer.features import list_features
    from catalens.indexer.features.sift import VOCABULARY
    from catalens.indexer.stores.backends import open_catalog

    source = Path(integrity.__file__).read_text()
    assert not [name for name in list_features() if f'"{name}"' in source or f"'{name}'" in source]
    vocabulary = index / "models" / "sift_vocabulary.pt"
    vocabulary.write_bytes(vocabulary.read_bytes()[:200])
    report = integrity.check_index(index)
    [finding] = [finding for finding in report.findings if finding.file == "models/sift_vocabulary.pt"]
    assert finding.status == "repaired" and "fitted again" in finding.detail and report.healthy
    catalog = open_catalog(index)
    try:
        state = VOCABULARY.status(catalog)
        assert state.fresh and state.stored
        assert not catalog.words("sift").stale(state.model.id_)
    finally:
        catalog.close()


def test_a_read_only_index_keeps_an_autoencoder_fitted_on_it_in_memory(index):
    from catalens.indexer.features.autoencoder import AUTOENCODER, MODEL_FILE, load_autoencoder
    from catalens.indexer.features.autoencoder_model import ConvAutoencoder
    from catalens.indexer.stores.backends import open_catalog

    pixels = np.random.default_rng(0).random((24, 3, 64, 64), dtype=np.float32)
    model = ConvAutoencoder(input_kind="pixels", code_channels=2, width=8, epochs=1, progress=False)
    catalog = open_catalog(index, read_only=True)
    try:
        state = AUTOENCODER.refit(catalog, force=True, fit=lambda catalog, progress: model.fit(pixels))
        assert state.model is model and not state.stored
        assert load_autoencoder(catalog).model is model
        assert catalog.feature("ae").dim == model.code_dim
    finally:
        catalog.close()
    assert not (index / "models" / MODEL_FILE).exists()
    assert not [path.name for path in (index / "models").iterdir() if path.name.endswith(".tmp")]


def test_the_adapted_network_is_fitted_by_finetune_alone(index):
    from catalens.indexer.features.deep_ft import ADAPTED_NETWORK, trained_keys
    from catalens.indexer.stores.backends import open_catalog

    catalog = open_catalog(index)
    try:
        state = ADAPTED_NETWORK.refit(catalog)
        assert state.model is None and "catalens finetune" in state.reason
        assert trained_keys(catalog) is None
    finally:
        catalog.close()
