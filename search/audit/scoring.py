"""A finding's score: a probability fitted on a few evidence columns, real findings against
planted ones."""

from __future__ import annotations

from typing import Any

import numpy as np

from catalens.indexer.estimator import Estimator


class EvidenceModel(Estimator):
    """A logistic regression of "the finding is real" on standardised evidence columns, its base
    rate set to ``prior`` (the positives are planted, so their share in the fit says nothing)."""

    fit_hint = "fit it on the catalog's evidence (search.audit)"

    def __init__(self, prior: float = 0.03, C: float = 1.0):
        self.prior = prior
        self.C = C

    def fit(self, X: np.ndarray, y: np.ndarray) -> EvidenceModel:
        from sklearn.linear_model import LogisticRegression

        X, y = np.asarray(X, np.float64), np.asarray(y, bool)
        self.mean_ = X.mean(axis=0)
        self.scale_ = np.maximum(X.std(axis=0), 1e-9)
        balanced = np.where(y, 0.5 / max(y.sum(), 1), 0.5 / max((~y).sum(), 1)) * len(y)
        model = LogisticRegression(C=self.C, max_iter=2000).fit((X - self.mean_) / self.scale_, y,
                                                                 sample_weight=balanced)
        self.coef_ = model.coef_[0].astype(np.float64)
        # Fitted on balanced classes: move the intercept to the prior's odds.
        self.intercept_ = float(model.intercept_[0] + np.log(self.prior / (1 - self.prior)))
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        self.check_is_fitted()
        return ((np.asarray(X, np.float64) - self.mean_) / self.scale_) @ self.coef_ + self.intercept_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """P(real) per row."""
        return 1.0 / (1.0 + np.exp(-np.clip(self.decision_function(X), -50, 50)))

    def _state(self) -> dict[str, Any]:
        return {"mean_": self.mean_, "scale_": self.scale_, "coef_": self.coef_, "intercept_": self.intercept_}

    def _restore(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
