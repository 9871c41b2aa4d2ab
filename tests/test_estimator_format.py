"""The model file format: numpy archives read without pickle and without torch, tensors given
back as tensors, files of older catalens (``torch.save``) still read, damaged files named."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from typing import Any

import numpy as np
import pytest

from catalens.indexer.estimator import FORMAT, Estimator, ModelFileError


class Plain(Estimator):
    """A numpy-only model: whatever ``fit`` is given is its state."""

    def __init__(self, size: int = 3, name: str = "plain", weights: tuple = (0.5, 2.0), progress: bool = True):
        self.size, self.name, self.weights, self.progress = size, name, weights, progress

    def fit(self, state: dict[str, Any]) -> Plain:
        self.state_ = state
        return self

    def _state(self) -> dict[str, Any]:
        return self.state_

    def _restore(self, state: dict[str, Any]) -> None:
        self.state_ = state


class Other(Plain):
    pass


def numpy_state() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.normal(size=(4, 3)).astype(np.float32),
        "f16": rng.normal(size=5).astype(np.float16),
        "f64": rng.normal(size=(2, 2, 2)),
        "i64": np.arange(-3, 3, dtype=np.int64),
        "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "u8": np.arange(250, 256, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar_array": np.array(7.25, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "fortran": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
        "strings": np.array([["a", "bé"], ["", "long string"]]),
        "nested": {"list": [1, 2.5, None, "x", np.arange(3, dtype=np.int16), {"deep": np.ones(2, np.float32)}],
                   "tuple": (np.float32(1.5), np.int64(-4), np.bool_(True)), "nan": float("nan")},
        "number": 3, "text": "hello", "none": None, "flag": False,
    }


def test_numpy_state_round_trips_with_dtypes_shapes_and_values(tmp_path):
    state = numpy_state()
    Plain(size=5, name="n", weights=(1.0, 3.0)).fit(state).save(tmp_path / "m.pt")
    loaded = Plain.load(tmp_path / "m.pt")
    assert (loaded.size, loaded.name, loaded.weights, loaded.progress) == (5, "n", [1.0, 3.0], True)
    got = loaded.state_
    for key in ("f32", "f16", "f64", "i64", "i32", "u8", "bool", "scalar_array", "empty", "fortran"):
        assert isinstance(got[key], np.ndarray), key
        assert got[key].dtype == state[key].dtype and got[key].shape == state[key].shape, key
        np.testing.assert_array_equal(got[key], state[key])
    assert got["strings"].dtype.kind == "U" and got["strings"].tolist() == [["a", "bé"], ["", "long string"]]
    deep = got["nested"]["list"]
    assert deep[:4] == [1, 2.5, None, "x"] and deep[4].dtype == np.int16 and deep[4].tolist() == [0, 1, 2]
    assert deep[5]["deep"].dtype == np.float32 and deep[5]["deep"].tolist() == [1.0, 1.0]
    assert got["nested"]["tuple"] == [1.5, -4, True]
    assert [type(v) for v in got["nested"]["tuple"]] == [float, int, bool]
    assert np.isnan(got["nested"]["nan"])
    assert (got["number"], got["text"], got["none"], got["flag"]) == (3, "hello", None, False)


def test_the_file_is_a_numpy_archive_that_loads_without_pickle(tmp_path):
    path = Plain().fit(numpy_state()).save(tmp_path / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no ".npz" appended, no tmp left
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(archive["__meta__"].tobytes().decode("utf-8"))
        assert meta["estimator"] == "Plain" and meta["format"] == FORMAT == 2
        assert meta["state"]["f32"] == {"__ndarray__": meta["state"]["f32"]["__ndarray__"]}
        assert archive[meta["state"]["f32"]["__ndarray__"]].dtype == np.float32
    with zipfile.ZipFile(path) as archive:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())


def test_overrides_replace_saved_parameters(tmp_path):
    Plain(progress=True).fit({"x": np.ones(2)}).save(tmp_path / "m.pt")
    loaded = Plain.load(tmp_path / "m.pt", progress=False)
    assert loaded.progress is False
    # What the file wrote stays visible: a caller can tell an override (or a default) from it.
    assert loaded.saved_params_ == {"size": 3, "name": "plain", "weights": [0.5, 2.0], "progress": True}


def test_saved_parameters_read_without_building_the_model(tmp_path):
    from catalens.indexer.estimator import ModelFileError, saved_params

    Plain(size=5, name="p").fit({"x": np.ones(2)}).save(tmp_path / "m.pt")
    assert saved_params(tmp_path / "m.pt", "Plain") == {"size": 5, "name": "p", "weights": [0.5, 2.0], "progress": True}
    with pytest.raises(ModelFileError, match="holds a Plain, not a Other"):
        saved_params(tmp_path / "m.pt", "Other")


def test_an_object_array_is_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match="object"):
        Plain().fit({"x": np.array([{"a": 1}], dtype=object)}).save(tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_tensors_come_back_as_tensors_of_their_dtype(tmp_path):
    torch = pytest.importorskip("torch")
    tensors = {
        "float32": torch.randn(3, 4), "float16": torch.randn(5).half(), "int64": torch.arange(4),
        "bool": torch.tensor([True, False]), "uint8": torch.arange(250, 256, dtype=torch.uint8),
        "bfloat16": torch.randn(6).to(torch.bfloat16), "scalar": torch.tensor(3, dtype=torch.int64),
        "parameter": torch.nn.Parameter(torch.ones(2)),
    }
    network = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    state = {"tensors": tensors, "model": network.state_dict(), "array": np.ones(3, np.float32)}
    Plain().fit(state).save(tmp_path / "m.pt")
    got = Plain.load(tmp_path / "m.pt").state_
    for key, tensor in tensors.items():
        assert isinstance(got["tensors"][key], torch.Tensor), key
        assert got["tensors"][key].dtype == tensor.dtype and got["tensors"][key].shape == tensor.shape, key
        assert torch.equal(got["tensors"][key], tensor.detach()), key
    assert isinstance(got["array"], np.ndarray) and got["array"].dtype == np.float32
    restored = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    restored.load_state_dict(got["model"])
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in network.state_dict().items())


def test_a_file_of_format_1_written_with_torch_save_still_loads(tmp_path):
    torch = pytest.importorskip("torch")
    weights = np.arange(6, dtype=np.float32).reshape(2, 3)
    payload = {"estimator": "Plain", "format": 1, "params": {"size": 9, "name": "old", "weights": [1.0]},
               "state": {"w": {"__ndarray__": torch.from_numpy(weights)},
                         "labels": {"__strings__": ["a", "b"], "shape": [2]},
                         "model": {"bias": torch.ones(2)}, "count": 4}}
    torch.save(payload, tmp_path / "old.pt")
    loaded = Plain.load(tmp_path / "old.pt")
    assert (loaded.size, loaded.name, loaded.weights) == (9, "old", [1.0])
    got = loaded.state_
    assert isinstance(got["w"], np.ndarray) and got["w"].dtype == np.float32
    np.testing.assert_array_equal(got["w"], weights)
    assert got["labels"].tolist() == ["a", "b"] and got["count"] == 4
    assert isinstance(got["model"]["bias"], torch.Tensor) and torch.equal(got["model"]["bias"], torch.ones(2))
    with pytest.raises(ModelFileError, match="holds a Plain, not a Other"):
        Other.load(tmp_path / "old.pt")


def test_a_file_of_another_estimator_says_what_it_holds(tmp_path):
    Plain().fit({"x": np.ones(2)}).save(tmp_path / "m.pt")
    with pytest.raises(ModelFileError, match=r"m\.pt: holds a Plain, not a Other; delete it and fit it again"):
        Other.load(tmp_path / "m.pt")


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        Plain.load(tmp_path / "absent.pt")


def damaged_files(tmp_path) -> dict[str, bytes]:
    whole = Plain().fit(numpy_state()).save(tmp_path / "whole.pt").read_bytes()
    with zipfile.ZipFile(tmp_path / "foreign.zip", "w") as archive:
        archive.writestr("readme.txt", "not a model")
    broken_meta = tmp_path / "meta.zip"
    with open(broken_meta, "wb") as handle:
        np.savez(handle, __meta__=np.frombuffer(b"{not json", np.uint8))
    missing_array = tmp_path / "missing.zip"
    meta = {"estimator": "Plain", "format": 2, "params": {}, "state": {"x": {"__ndarray__": "a7"}}}
    with open(missing_array, "wb") as handle:
        np.savez(handle, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    pickled = tmp_path / "pickled.zip"
    with open(pickled, "wb") as handle:
        np.savez(handle, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                 a7=np.array([{"a": 1}], dtype=object))
    return {
        "random": np.random.default_rng(0).bytes(4096), "empty": b"", "text": b"a file of an older catalens",
        "truncated_half": whole[: len(whole) // 2], "truncated_tail": whole[:-10], "head_500": whole[:500],
        "foreign_zip": (tmp_path / "foreign.zip").read_bytes(), "broken_meta": broken_meta.read_bytes(),
        "missing_array": missing_array.read_bytes(), "pickled_array": pickled.read_bytes(),
    }


@pytest.mark.parametrize("kind", ["random", "empty", "text", "truncated_half", "truncated_tail", "head_500",
                                  "foreign_zip", "broken_meta", "missing_array", "pickled_array"])
def test_a_damaged_file_is_a_model_file_error_naming_the_file(tmp_path, kind):
    path = tmp_path / f"damaged_{kind}.pt"
    path.write_bytes(damaged_files(tmp_path)[kind])
    with pytest.raises(ModelFileError, match=rf"damaged_{kind}\.pt: not a readable catalens model \(\w+\); "
                                             "delete it and fit it again"):
        Plain.load(path)


NUMPY_ONLY = """
import sys
import numpy as np
import catalens.indexer.estimator as estimator
assert "torch" not in sys.modules, "importing catalens.indexer.estimator imported torch"

class Plain(estimator.Estimator):
    def __init__(self, size=3):
        self.size = size
    def _state(self):
        return self.state_
    def _restore(self, state):
        self.state_ = state

model = Plain(4)
model.state_ = {"w": np.ones((2, 3), np.float32), "labels": np.array(["a", "b"]), "n": np.int64(2)}
path = model.save(sys.argv[1])
assert "torch" not in sys.modules, "save imported torch"
loaded = Plain.load(path)
assert "torch" not in sys.modules, "load imported torch"
assert loaded.size == 4 and loaded.state_["w"].dtype == np.float32 and loaded.state_["labels"].tolist() == ["a", "b"]
print("torch-free")
"""


def test_saving_and_loading_a_numpy_model_does_not_import_torch(tmp_path):
    result = subprocess.run([sys.executable, "-c", NUMPY_ONLY, str(tmp_path / "m.pt")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch-free"
