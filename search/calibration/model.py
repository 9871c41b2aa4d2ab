"""``MatchCalibrator``: per search mode, a logistic regression from a result's evidence
(``evidence.EVIDENCE``) to the probability that it shows the query's product, and the mode's
default match threshold: the lowest confidence at which the calibration queries' top results reach
``target_precision``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from catalens.indexer.estimator import Estimator
from catalens.search.calibration.evidence import EVIDENCE

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """A catalog on which no calibration can be fitted (too few items or products); the message says why."""


class MatchCalibrator(Estimator):
    """Per mode, a logistic regression from a result's evidence to P(same product as the query).

    Hyper-parameters:
      target_precision  the default match threshold is the lowest confidence at which the
                        calibration queries' top results are right this often
      C                 inverse regularisation of the logistic regressions
      max_stale         share of the catalog (items added plus removed, over the items at fit
                        time) that may change before the model counts as stale

    Every coefficient is kept >= 0 (a feature that comes out negative is dropped and the model
    refitted), so a confidence never falls when a result's evidence grows.
    """

    fit_hint = "run 'catalens calibrate'"

    def __init__(self, target_precision: float = 0.95, C: float = 1.0, max_stale: float = 0.2):
        self.target_precision = target_precision
        self.C = C
        self.max_stale = max_stale

    def fit(self, evidence: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
            catalog_keys: np.ndarray, features_read: str = "") -> MatchCalibrator:
        """``evidence[mode] = (rows (n, len(EVIDENCE)), right (n,) bool, is_top (n,) bool)``:
        hits of calibration queries, whether each shows the query's product, whether it was the top hit.
        ``features_read``: a digest of what computed the evidence (``fitting.features_read``)."""
        from sklearn.linear_model import LogisticRegression

        modes, coefs, intercepts, thresholds, precisions, coverages, counts = [], [], [], [], [], [], []
        for mode, (rows, right, is_top) in evidence.items():
            rows, right, is_top = np.asarray(rows, np.float64), np.asarray(right, bool), np.asarray(is_top, bool)
            if not len(rows):  # no held-out query found anything in this mode: no evidence either way
                rows = np.zeros((0, len(EVIDENCE)))
            mean, std = (rows.mean(axis=0), rows.std(axis=0)) if len(rows) else (np.zeros(len(EVIDENCE)),) * 2
            active = std > 1e-9
            std[~active] = 1.0
            coef = np.zeros(rows.shape[1])
            # With one kind of answer only, or no evidence that varies, the rate of right answers
            # (with a pseudo-count each way) is all there is to say.
            intercept = float(np.log((right.sum() + 1) / (len(right) - right.sum() + 1)))
            if not len(rows) or right.all() or not right.any() or not active.any():
                log.info("calibration: mode %s has one kind of answer or no varying evidence; its confidence "
                         "is the rate of right answers", mode)
            else:
                while True:
                    model = LogisticRegression(C=self.C, max_iter=1000)
                    model.fit(((rows - mean) / std)[:, active], right)
                    coef = np.zeros(rows.shape[1])
                    coef[active] = model.coef_[0] / std[active]
                    if (coef >= 0).all() or (active & (coef > 0)).sum() == 0:
                        break
                    active &= coef > 0
                if (coef >= 0).all():
                    intercept = float(model.intercept_[0] - np.dot(model.coef_[0], mean[active] / std[active]))
                else:  # the last feature left speaks against itself: no usable evidence
                    coef = np.zeros(rows.shape[1])
            confidence = _sigmoid(rows @ coef + intercept)
            threshold, precision, coverage = _threshold(confidence[is_top], right[is_top], self.target_precision)
            modes.append(mode)
            coefs.append(coef)
            intercepts.append(intercept)
            thresholds.append(threshold)
            precisions.append(precision)
            coverages.append(coverage)
            counts.append(int(is_top.sum()))
        if not modes:
            raise CalibrationError("no held-out query could be searched")
        self.modes_ = np.asarray(modes, dtype=str)
        self.coef_ = np.asarray(coefs, np.float64)
        self.intercept_ = np.asarray(intercepts, np.float64)
        self.threshold_ = np.asarray(thresholds, np.float64)
        self.precision_ = np.asarray(precisions, np.float64)
        self.coverage_ = np.asarray(coverages, np.float64)
        self.queries_ = np.asarray(counts, np.int64)
        self.catalog_keys_ = np.unique(np.asarray(catalog_keys, np.int64))
        self.fitted_at_ = float(time.time())
        self.features_read_ = str(features_read)
        return self

    def modes(self) -> list[str]:
        self.check_is_fitted()
        return [str(mode) for mode in self.modes_]

    def _row(self, mode: str) -> int:
        self.check_is_fitted()
        found = np.flatnonzero(self.modes_ == mode)
        if not len(found):
            raise KeyError(f"mode {mode!r} is not calibrated (calibrated: {', '.join(self.modes())})")
        return int(found[0])

    def predict_proba(self, mode: str, evidence: np.ndarray) -> np.ndarray:
        """P(same product) of each evidence row, in [0, 1]."""
        row = self._row(mode)
        return _sigmoid(np.asarray(evidence, np.float64).reshape(-1, len(EVIDENCE)) @ self.coef_[row] + self.intercept_[row])

    def threshold(self, mode: str) -> float:
        """The default match threshold of ``mode``."""
        return float(self.threshold_[self._row(mode)])

    def changed_fraction(self, current_keys: np.ndarray) -> float:
        """Items added plus removed since the fit, over the items at fit time."""
        self.check_is_fitted()
        current = np.unique(np.asarray(current_keys, np.int64))
        changed = len(np.setxor1d(current, self.catalog_keys_, assume_unique=True))
        return changed / max(len(self.catalog_keys_), 1)

    def summary(self) -> list[dict[str, Any]]:
        """Per mode: threshold, and the precision and coverage of ``match`` on the calibration queries."""
        self.check_is_fitted()
        return [{"mode": str(mode), "queries": int(n), "threshold": round(float(t), 4),
                 "precision": round(float(p), 4), "coverage": round(float(c), 4)}
                for mode, n, t, p, c in zip(self.modes_, self.queries_, self.threshold_, self.precision_,
                                             self.coverage_, strict=True)]

    def _state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in
                ("modes_", "coef_", "intercept_", "threshold_", "precision_", "coverage_", "queries_",
                 "catalog_keys_", "fitted_at_", "features_read_")}

    def _restore(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))


def _threshold(confidence: np.ndarray, right: np.ndarray, target: float) -> tuple[float, float, float]:
    """(lowest threshold whose matches are right ``target`` of the time, their precision, coverage).

    No threshold reaching the target gives 1.0: no confident match, rather than wrong ones."""
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(right[order])
    precision = hits / np.arange(1, len(order) + 1)
    reach = np.flatnonzero(precision >= target)
    if not len(reach):
        return 1.0, 0.0, 0.0
    last = int(reach[-1])
    # Ties: every query with the threshold's confidence matches, so count them all.
    threshold = float(confidence[order][last])
    matched = confidence >= threshold
    return threshold, float(right[matched].mean()), float(matched.mean())

