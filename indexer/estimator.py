"""One contract for everything fitted on a catalog, after scikit-learn's estimators.

Hyper-parameters go to ``__init__`` and are stored unchanged; ``fit`` learns and returns
``self``; what was learned lives in attributes ending in ``_``. ``save`` / ``load`` write and
read one file per model, the same way for the visual vocabulary, the autoencoder, the
fine-tuned network top and the projection head: the class, its hyper-parameters and its
learned state. The file is an uncompressed numpy ``.npz`` archive: one JSON document
(``__meta__``) with every array replaced by the name of its entry. It is read with
``np.load(allow_pickle=False)``, so a model file can never run code, and without importing
torch; torch is imported only to give tensors back to a model that saved tensors, and to read
the files of older catalens (``torch.save`` archives, read with ``weights_only=True``).
"""

from __future__ import annotations

import inspect
import json
import sys
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from catalens.errors import UnavailableError
from catalens.indexer.files import atomic_path

E = TypeVar("E", bound="Estimator")

FORMAT = 2

META = "__meta__"


class NotFittedError(UnavailableError, RuntimeError):
    """A learned model used before it was fitted; the message says how to fit it."""


class ModelFileError(UnavailableError, RuntimeError):
    """A model file that cannot be loaded; the message names the file and what to do."""


def _is_tensor(value: Any) -> bool:
    # A tensor exists only once torch is imported; asking sys.modules keeps numpy-only models torch-free.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _encode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` as JSON, its arrays and tensors moved into ``arrays`` and referred to by name."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "US":
            return {"__strings__": [str(v) for v in value.ravel()], "shape": list(value.shape)}
        if value.dtype.hasobject:
            raise TypeError(f"cannot save an array of {value.dtype} (it would need pickle)")
        return {"__ndarray__": _add(arrays, value)}
    if _is_tensor(value):
        return _encode_tensor(value, arrays)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"cannot save a dict with keys that are not strings: {list(value)[:5]}")
        return {key: _encode(item, arrays) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(item, arrays) for item in value]
    return value


def _encode_tensor(tensor: Any, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    tensor = tensor.detach().cpu()
    try:
        return {"__tensor__": _add(arrays, tensor.numpy())}
    except TypeError:
        # numpy has no bfloat16 (nor float8): float32 holds every value of those exactly.
        if not tensor.is_floating_point():
            raise TypeError(f"cannot save a tensor of {tensor.dtype}") from None
        return {"__tensor__": _add(arrays, tensor.to(torch.float32).numpy()),
                "dtype": str(tensor.dtype).removeprefix("torch.")}


def _add(arrays: dict[str, np.ndarray], array: np.ndarray) -> str:
    name = f"a{len(arrays)}"
    arrays[name] = array
    return name


def _decode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            found = value["__ndarray__"]
            return arrays[found] if isinstance(found, str) else found.numpy()  # format 1 held the tensor
        if "__tensor__" in value:
            return _tensor(arrays[value["__tensor__"]], value.get("dtype"))
        if "__strings__" in value:
            return np.asarray(value["__strings__"], dtype=str).reshape(value["shape"])
        return {key: _decode(item, arrays) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item, arrays) for item in value]
    return value


def _tensor(array: np.ndarray, dtype: str | None) -> Any:
    import torch

    tensor = torch.from_numpy(array)
    return tensor.to(getattr(torch, dtype)) if dtype else tensor


def _read(path: Path) -> tuple[Any, dict[str, np.ndarray]]:
    """The payload at ``path`` and the arrays its references name, whichever format wrote it."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if f"{META}.npy" in names:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        return json.loads(arrays.pop(META).tobytes().decode("utf-8")), arrays
    if any(name.endswith("data.pkl") for name in names):
        # Format 1: a torch.save archive of tensors; only these files need torch.
        import torch

        return torch.load(path, map_location="cpu", weights_only=True), {}
    raise ValueError("a zip archive without a catalens model")


def _unreadable(path: Path, error: Exception) -> ModelFileError:
    return ModelFileError(f"{path}: not a readable catalens model ({type(error).__name__}); "
                          f"delete it and fit it again")


def _payload(path: Path, estimator: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The payload of the ``estimator`` (a class name) saved at ``path`` and its arrays; a file
    that is damaged or holds another model is a ``ModelFileError`` naming it."""
    try:
        payload, arrays = _read(path)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - zipfile, numpy, json and torch raise many kinds for a damaged file
        raise _unreadable(path, error) from None
    if not isinstance(payload, dict) or payload.get("estimator") != estimator:
        found = payload.get("estimator") if isinstance(payload, dict) else type(payload).__name__
        raise ModelFileError(f"{path}: holds a {found or 'model of an older catalens'}, not a {estimator}; "
                             "delete it and fit it again")
    return payload, arrays


def _decoded(path: Path, payload: dict[str, Any], arrays: dict[str, np.ndarray], part: str) -> Any:
    try:
        return _decode(payload[part], arrays)
    except (KeyError, TypeError, AttributeError) as error:  # a reference to an array the file lacks
        raise _unreadable(path, error) from None


def saved_params(path: str | Path, estimator: str) -> dict[str, Any]:
    """The hyper-parameters of the ``estimator`` (a class name) saved at ``path``, read without
    building the model: for a file of this format, without importing torch either."""
    path = Path(path)
    return _decoded(path, *_payload(path, estimator), "params")


def saved_state(path: str | Path, estimator: str) -> dict[str, Any]:
    """What the ``estimator`` (a class name) saved at ``path`` learned, as stored, without building
    the model (a model's torch modules stay as arrays)."""
    path = Path(path)
    return _decoded(path, *_payload(path, estimator), "state")


class Estimator:
    """Base of catalens' fitted models: ``get_params``, ``check_is_fitted``, ``save``, ``load``.

    Subclasses implement ``fit`` and give their learned state with ``_state`` (a dict of
    arrays, tensors, numbers, strings) and take it back with ``_restore``. ``fit_hint`` is
    the sentence a ``NotFittedError`` ends with (the command that fits this model).
    """

    fit_hint = "call fit() first"

    def get_params(self) -> dict[str, Any]:
        """The ``__init__`` arguments, as given."""
        names = [name for name in inspect.signature(type(self).__init__).parameters if name != "self"]
        return {name: getattr(self, name) for name in names}

    def is_fitted(self) -> bool:
        return any(name.endswith("_") and not name.startswith("_") for name in vars(self))

    def check_is_fitted(self) -> None:
        if not self.is_fitted():
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; {self.fit_hint}")

    # --- persistence

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _restore(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash leaves the previous file whole."""
        self.check_is_fitted()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        params = {key: value for key, value in self.get_params().items() if _saveable_param(value)}
        arrays: dict[str, np.ndarray] = {}
        payload = {"estimator": type(self).__name__, "format": FORMAT, "params": _encode(params, arrays),
                   "state": _encode(self._state(), arrays)}
        meta = np.frombuffer(json.dumps(payload).encode("utf-8"), np.uint8)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            # A handle, not a path: np.savez appends ".npz" to a path that does not end in it.
            np.savez(handle, allow_pickle=False, **{META: meta}, **arrays)
        return path

    @classmethod
    def load(cls: type[E], path: str | Path, **overrides: Any) -> E:
        """The model saved at ``path``; ``overrides`` replace saved parameters (``progress``...).

        ``saved_params_`` keeps the parameters as the file wrote them: a parameter added to
        ``__init__`` after the file was written takes its default in the model, not in there."""
        path = Path(path)
        payload, arrays = _payload(path, cls.__name__)
        saved, state = _decoded(path, payload, arrays, "params"), _decoded(path, payload, arrays, "state")
        params = {**saved, **overrides}
        known = set(inspect.signature(cls.__init__).parameters)
        model = cls(**{key: value for key, value in params.items() if key in known})
        model._restore(state)
        model.saved_params_ = saved
        return model


def _saveable_param(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, tuple, dict))
