"""The catalog's own mistakes: items filed under the wrong category, one photo under two ids, photos
that are not a product (``catalens audit``).

Everything is leave-one-out evidence from the rows the index already stores (no new pass over the
catalog's images): each item's neighbours and their categories in every global feature, a
prototype + k-NN classifier of the catalog that never saw the item (the few-shot classifier's
structure, in closed form: removing one item from its leaf's prototype and from the neighbour
lists costs nothing, where 2,700 refits of the classifier would take an hour), and the product
grouping where the catalog gives one. Each finding's ``score`` is a probability fitted on the
catalog itself: for misfiled items, a logistic regression of the evidence of items as filed
against the same items planted under another leaf (half a sister leaf), which costs nothing
because an item's leave-one-out evidence does not depend on its own label; for non-products, the
same against a few generated placeholders (blank, gradient, noise, printed lines) embedded once
with the index's own features.

The misfiled suspects are scored again with verified local matches against their filed and
suggested leaves, read from the stored keypoints (``verified``).

The package's rooms, one a job: ``mislabelled``, ``verified``, ``duplicates``, ``non_products`` and
``dismissals``; what they share: ``records`` (settings, findings, the report), ``rows`` (the
stored rows and neighbour lists), ``scoring`` (the fitted probability); ``report`` runs them all.
"""

from catalens.search.audit.dismissals import DISMISSED_FILE, dismiss, item_digest, read_dismissed
from catalens.search.audit.duplicates import duplicate_pairs, duplicate_score
from catalens.search.audit.mislabelled import (
    LEVEL_NAMES,
    MISLABEL_EVIDENCE,
    LeaveOneOut,
    disagreeing_level,
    leave_one_out,
    mislabel_evidence,
    parent_of,
)
from catalens.search.audit.non_products import (
    PLACEHOLDERS_FILE,
    colour_entropy,
    placeholder_images,
    placeholder_rows,
    product_evidence,
)
from catalens.search.audit.records import PROBLEMS, AuditReport, AuditSettings, Finding
from catalens.search.audit.report import audit, select
from catalens.search.audit.rows import CatalogRows, NeighbourLists, nearest
from catalens.search.audit.scoring import EvidenceModel

__all__ = [
    # the audit
    "AuditReport", "AuditSettings", "Finding", "PROBLEMS", "audit", "dismiss", "select",
    # its parts, importable from here as before the package was split
    "CatalogRows", "colour_entropy", "disagreeing_level", "DISMISSED_FILE", "duplicate_pairs",
    "duplicate_score", "EvidenceModel", "item_digest", "leave_one_out", "LeaveOneOut", "LEVEL_NAMES",
    "mislabel_evidence", "MISLABEL_EVIDENCE", "nearest", "NeighbourLists", "parent_of", "placeholder_images",
    "placeholder_rows", "PLACEHOLDERS_FILE", "product_evidence", "read_dismissed",
]
