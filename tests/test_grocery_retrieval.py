"""Real-data acceptance of the deep path on the grocery dataset (catalog iconic+train, queries val)."""

from collections import Counter

import pytest

from catalens.indexer.backends import open_catalog
from catalens.search.engine import SearchEngine


@pytest.mark.slow
def test_deep_top1_product_accuracy_on_val_is_at_least_54_percent(grocery_index, val_photos):
    engine = SearchEngine(open_catalog(grocery_index))
    results = engine.search([photo.path for photo in val_photos], k=1, mode="deep")
    hits, totals = Counter(), Counter()
    for photo, result in zip(val_photos, results, strict=True):
        assert result.error is None, result.error
        correct = result.results[0].category == photo.category
        hits[photo.top] += correct
        totals[photo.top] += 1
    accuracy = sum(hits.values()) / sum(totals.values())
    print("deep top-1:", {group: round(hits[group] / totals[group], 3) for group in totals}, "overall", round(accuracy, 3))
    assert accuracy >= 0.54
