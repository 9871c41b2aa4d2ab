"""One lifecycle for what is fitted on a catalog: kept per catalog state, read from the index's
models folder, checked for freshness, and fitted again only by whoever asks for a refit.

A ``FittedSlot`` names one such model (its file, how to load, fit and judge it). Readers ask
``current``, which never fits: it answers the last valid model, stale or not, and says why it is
stale or missing. Writers (a command that changed the catalog, a server after its writes) ask
``refit``, which fits where the model is stale and saves it atomically, or keeps it in memory
where the index cannot be written. A model that only a training command fits (the autoencoder,
the adapted network) has a slot too: the command passes its run and its commit to ``refit``.
``BackgroundRefit`` runs refits on a thread, a while after the last write, while readers keep
the last valid model.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from weakref import WeakKeyDictionary

from catalens.indexer.estimator import ModelFileError
from catalens.indexer.files import disk_full, file_stamp, held_read_only

log = logging.getLogger(__name__)

M = TypeVar("M")


@dataclass(frozen=True)
class FittedState(Generic[M]):
    """What a slot holds for one catalog now. ``model`` is None where nothing valid is stored
    or fitted; ``reason`` says why it is missing or stale ("" when fresh)."""

    name: str
    model: M | None
    fresh: bool
    stored: bool = False  # the model is the one in the index's models folder
    reason: str = ""
    fitted_at: float | None = None
    refitting: bool = False
    unreadable: bool = False  # the file in the models folder does not load (``reason`` says why where no model is held)

    def to_json(self) -> dict[str, Any]:
        return {"present": self.model is not None, "fresh": self.fresh, "stale": self.model is not None and not self.fresh,
                "stored": self.stored, "reason": self.reason or None, "fitted": self.fitted_at,
                "refitting": self.refitting}


@dataclass
class _Held:
    """One slot's model for one catalog, and who is fitting it."""

    model: Any = None
    stored: bool = False
    fitted_at: float | None = None
    file_stamp: tuple[int, int, int] | None = None  # of the file last read or written; another process's save changes it
    missing: str = ""  # why no model could be read
    unreadable: bool = False  # the file last looked at does not load
    checked_at: Any = object()  # the catalog generation ``stale`` was judged at
    stale: str | None = None
    unfittable: tuple[Any, str] | None = None  # (generation, why) of a fit that cannot succeed on that state
    warned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    # One fit at a time per slot and catalog; readers never wait for it.
    fit_lock: threading.Lock = field(default_factory=threading.Lock)


def _save_estimator(model: Any, path: Path) -> None:
    model.save(path)


@dataclass(frozen=True, eq=False)
class FittedSlot(Generic[M]):
    """A model fitted on the whole catalog, stored as ``model_file`` in its models folder.

    ``load(catalog, path)`` reads the file (``ModelFileError`` or ``ValueError`` where it cannot
    serve this catalog at all); ``fit(catalog, progress)`` fits one (``ValueError`` where this
    catalog cannot be fitted: too few items...), or returns None where the catalog wants none
    (nothing left to fit on); ``fresh(model, catalog)`` is None while the model still describes
    the catalog, else why not; ``save(model, path)`` writes atomically. A slot without ``fit`` is
    fitted by the command ``fitted_by`` alone (a training run), which passes its run to ``refit``."""

    name: str
    model_file: str
    load: Callable[[Any, Path], M]
    fresh: Callable[[M, Any], str | None]
    fit: Callable[[Any, bool], M | None] | None = None
    save: Callable[[M, Path], None] = _save_estimator
    fitted_by: str | None = None
    _held: WeakKeyDictionary = field(default_factory=WeakKeyDictionary, repr=False)
    _registry_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def path(self, catalog: Any) -> Path:
        return Path(catalog.models_dir) / self.model_file

    def _for(self, catalog: Any) -> _Held:
        with self._registry_lock:
            held = self._held.get(catalog)
            if held is None:
                held = self._held[catalog] = _Held()
            return held

    # --- reading: never fits

    def status(self, catalog: Any, *, judge: bool = True) -> FittedState[M]:
        """The model a reader gets now, whether it is fresh, and why not; nothing is fitted or logged.

        ``judge=False`` leaves freshness unjudged (``fresh`` repeats the last judgement): for a reader
        that uses whatever was fitted last, where judging would read the catalog (a query's visual
        words must come from the vocabulary the stored words came from, fresh or not)."""
        held = self._for(catalog)
        with held.lock:
            self._read_file(catalog, held)
            generation = catalog.generation
            if judge and held.model is not None and held.checked_at != generation:
                held.stale, held.checked_at = self.fresh(held.model, catalog), generation
            return self._state(held, generation)

    def require(self, catalog: Any, missing: Exception, *, judge: bool = False) -> M:
        """The model a reader gets now (freshness unjudged unless ``judge``); where none is held,
        ``ModelFileError`` for a stored file that does not load, else ``missing``."""
        state = self.status(catalog, judge=judge)
        if state.model is None:
            raise ModelFileError(state.reason) if state.unreadable else missing
        return state.model

    def current(self, catalog: Any) -> FittedState[M]:
        """``status``, and a warning the first time a reader finds no model at all."""
        state = self.status(catalog)
        held = self._for(catalog)
        if state.model is None and not held.warned:
            held.warned = True
            log.warning("%s: %s: %s; answering without it until it is fitted", catalog.location, self.name,
                        state.reason)
        return state

    def _read_file(self, catalog: Any, held: _Held) -> None:
        """Read the stored model where the file changed since it was last read or written here."""
        path = self.path(catalog)
        stamp = file_stamp(path)
        if stamp is None or stamp == held.file_stamp:
            if stamp is None:
                held.unreadable = False
                if held.model is None:
                    held.missing = f"no {self.name} is stored with this index"
            return
        held.file_stamp = stamp
        try:
            model = self.load(catalog, path)
        except (ModelFileError, OSError, ValueError) as error:
            # A model already held (fitted here, or read before) serves on; the file is fitted again.
            held.missing, held.unreadable = str(error), True
            log.info("%s: %s", catalog.location, error)
            return
        held.model, held.stored, held.fitted_at, held.warned = model, True, stamp[0] / 1e9, False
        held.checked_at, held.unreadable = object(), False

    def _state(self, held: _Held, generation: Any) -> FittedState[M]:
        refitting = held.fit_lock.locked()
        if held.model is None:
            reason = held.missing or f"no {self.name} is stored with this index"
            if held.unfittable is not None and held.unfittable[0] == generation:
                reason = held.unfittable[1]
            return FittedState(self.name, None, False, reason=reason, refitting=refitting, unreadable=held.unreadable)
        return FittedState(self.name, held.model, held.stale is None, held.stored, held.stale or "", held.fitted_at,
                           refitting, held.unreadable)

    # --- writing: who changed the catalog refits

    def refit(self, catalog: Any, *, force: bool = False, store: bool = True, progress: bool = False,
              fit: Callable[[Any, bool], M | None] | None = None,
              save: Callable[[M, Path], None] | None = None) -> FittedState[M]:
        """Fit the model where it is stale or missing (always with ``force``), and save it where
        ``store`` and the folder allows; else keep it in memory. A catalog the slot's own fit
        cannot fit is not tried again until it changes. A fit that returns None removes the
        stored model: the catalog wants none.

        ``fit`` and ``save`` stand in for the slot's own: a training command's run, and its commit
        (the model file with the rows its model made). Their errors are the caller's: a
        ``ValueError`` of that fit, and any failure of that save, are raised (nothing is held)."""
        held = self._for(catalog)
        with held.fit_lock:
            state = self.status(catalog)
            generation = catalog.generation
            if not force and (state.fresh or (held.unfittable is not None and held.unfittable[0] == generation)):
                return state
            started = time.perf_counter()
            try:
                model = (fit or self._own_fit)(catalog, progress)
            except ValueError as error:
                if fit is not None:
                    raise
                with held.lock:
                    held.unfittable = (generation, str(error))
                log.warning("%s: cannot fit the %s: %s", catalog.location, self.name, error)
                return self.status(catalog)
            if model is None:
                self.drop(catalog)
                return self.status(catalog)
            full = None
            if save is not None:
                if store:
                    save(model, self.path(catalog))
                stored = store
            else:
                try:
                    stored = store and self._save(catalog, model)
                except OSError as error:  # a full disk: the fit serves this process, and the caller hears of it
                    full, stored = error, False
            with held.lock:
                held.model, held.stored, held.fitted_at, held.unfittable = model, stored, time.time(), None
                # The file as it is now, ours or an older one: neither is read back over this fit.
                held.file_stamp = file_stamp(self.path(catalog))
                held.checked_at, held.warned, held.unreadable = object(), False, False
            log.info("%s: %s fitted in %.1fs%s", catalog.location, self.name, time.perf_counter() - started,
                     "" if stored else " (kept in memory)")
            if full is not None:
                raise full
            return self.status(catalog)

    def _own_fit(self, catalog: Any, progress: bool) -> M | None:
        if self.fit is None:
            raise ValueError(f"the {self.name} is fitted by '{self.fitted_by}' alone: run it")
        return self.fit(catalog, progress)

    def drop(self, catalog: Any) -> None:
        """The catalog wants no model (nothing left to fit on, a training run that kept none): the
        stored file is removed, where the folder allows, and nothing is held."""
        held, path = self._for(catalog), self.path(catalog)
        with held.lock:
            # Where the folder cannot be written, this process holds none all the same.
            try:
                if not held_read_only(path):
                    path.unlink(missing_ok=True)
            except OSError as error:
                log.info("%s: cannot remove the %s (%s)", catalog.location, self.name, error)
            held.model, held.stored, held.fitted_at, held.unfittable = None, False, None, None
            held.file_stamp = file_stamp(path)
            held.missing, held.unreadable, held.stale, held.checked_at = "", False, None, object()

    def _save(self, catalog: Any, model: M) -> bool:
        try:
            self.save(model, self.path(catalog))
        except OSError as error:  # a read-only folder still serves the fit, from memory
            if disk_full(error):
                raise
            log.info("%s: cannot store the %s (%s); kept in memory", catalog.location, self.name, error)
            return False
        return True


def refit_stale(catalog: Any, slots: Sequence[FittedSlot], *, store: bool = True, progress: bool = False,
                force: Sequence[str] = ()) -> list[FittedState]:
    """Every slot in turn fitted where stale or missing (and those named in ``force`` always)."""
    return [slot.refit(catalog, force=slot.name in force, store=store, progress=progress) for slot in slots]


class BackgroundRefit:
    """Refits on a thread, ``delay`` seconds after the last ``poke`` (writes come in bursts, and each
    refit reads the whole catalog). ``guard`` is held around each refit (a server's read lock, so
    that no write lands halfway); readers keep the last valid model meanwhile."""

    def __init__(self, catalog: Any, slots: Sequence[FittedSlot], *, delay: float = 3.0, store: bool = True,
                 guard: Callable[[], AbstractContextManager[Any]] | None = None):
        self.catalog, self.slots, self.delay, self.store = catalog, list(slots), delay, store
        self.guard = guard or contextlib.nullcontext
        self._due: float | None = None
        self._busy = False
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="catalens-refit", daemon=True)
        self._thread.start()

    def poke(self, delay: float | None = None) -> None:
        """The catalog changed (or may be stale): refit once it has been quiet for ``delay`` seconds."""
        with self._wake:
            self._due = time.monotonic() + (self.delay if delay is None else delay)
            self._wake.notify_all()

    def idle(self) -> bool:
        with self._wake:
            return self._due is None and not self._busy

    def wait(self, timeout: float | None = None) -> bool:
        """Until no refit is due or running (True), or ``timeout`` passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            while self._due is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wake.wait(left if left is None else min(left, 0.5))
            return True

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout=60)

    def _next(self) -> bool:
        """Wait until a refit is due; False once closed."""
        with self._wake:
            while not self._closed:
                if self._due is not None and time.monotonic() >= self._due:
                    self._due, self._busy = None, True
                    return True
                self._wake.wait(None if self._due is None else max(self._due - time.monotonic(), 0.0))
            return False

    def _run(self) -> None:
        while self._next():
            try:
                with self.guard():
                    refit_stale(self.catalog, self.slots, store=self.store)
            except Exception as error:  # noqa: BLE001 - a failed refit must not end the thread; readers keep the last fit
                if disk_full(error):
                    log.warning("%s: the disk is full (%s); the new fit serves from memory until it can be stored",
                                self.catalog.location, error)
                    continue
                log.exception("%s: background refit failed; the last fitted models serve on", self.catalog.location)
            finally:
                with self._wake:
                    self._busy = False
                    self._wake.notify_all()
