"""One contract for everything fitted on a catalog, after scikit-learn's estimators.

Hyper-parameters go to ``__init__`` and are stored unchanged; ``fit`` learns and returns
``self``; what was learned lives in attributes ending in ``_``. ``save`` / ``load`` write and
read one file per model, the same way for the visual vocabulary, the autoencoder, the
fine-tuned network top and the projection head: the class, its hyper-parameters and its
learned state, as tensors, loaded with ``torch.load(weights_only=True)`` so a model file can
never run code.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

E = TypeVar("E", bound="Estimator")

FORMAT = 1


class NotFittedError(RuntimeError):
    """A learned model used before it was fitted; the message says how to fit it."""


class ModelFileError(RuntimeError):
    """A model file that cannot be loaded; the message names the file and what to do."""


def _encode(value: Any) -> Any:
    """Arrays as tensors (strings as lists), recursively: what ``weights_only`` loading accepts."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "US":
            return {"__strings__": [str(v) for v in value.ravel()], "shape": list(value.shape)}
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(item) for item in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return value["__ndarray__"].numpy()
        if "__strings__" in value:
            return np.asarray(value["__strings__"], dtype=str).reshape(value["shape"])
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item) for item in value]
    return value


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
        payload = {"estimator": type(self).__name__, "format": FORMAT, "params": _encode(params),
                   "state": _encode(self._state())}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls: type[E], path: str | Path, **overrides: Any) -> E:
        """The model saved at ``path``; ``overrides`` replace saved parameters (``progress``...)."""
        path = Path(path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as error:  # noqa: BLE001 - torch raises many kinds for a damaged file
            raise ModelFileError(f"{path}: not a readable catalens model ({type(error).__name__}); "
                                 f"delete it and fit it again") from None
        if not isinstance(payload, dict) or payload.get("estimator") != cls.__name__:
            found = payload.get("estimator") if isinstance(payload, dict) else type(payload).__name__
            raise ModelFileError(f"{path}: holds a {found or 'model of an older catalens'}, not a {cls.__name__}; "
                                 "delete it and fit it again")
        params = {**_decode(payload["params"]), **overrides}
        known = set(inspect.signature(cls.__init__).parameters)
        model = cls(**{key: value for key, value in params.items() if key in known})
        model._restore(_decode(payload["state"]))
        return model


def _saveable_param(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, tuple, dict))
