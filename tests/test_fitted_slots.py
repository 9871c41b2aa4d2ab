"""The ``FittedSlot`` contract beyond the classifier and the calibration: a fit that wants no
model, a model only a training command fits (its run and commit passed in), a stored file that
does not load, readers that do not judge freshness."""

from __future__ import annotations

import json
from pathlib import Path

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
