"""Adapting the network to the catalog (``catalens finetune``): the ``deep_ft`` embedding.

Frozen ImageNet features do not know which details tell this catalog's products apart, nor
what a shop photo of a packshot looks like. The backbone's top stages (for EfficientNet-Lite:
its last two blocks and the head convolution; everything below frozen) are trained on the
catalog's own products with a cosine classifier (normalised softmax, started at the products'
mean frozen embeddings), on augmented views (``augment``): photos re-cropped, warped, re-lit,
blurred; packshots cut out and pasted alone or in piles onto backgrounds. The frozen trunk runs
once per view and its maps are kept, so training costs only the top of the network. The network
itself (``AdaptedTop``) is in ``catalens.indexer.features.adapted_model``; this is its training run.

Whether search and classification then use the adapted vectors is decided on a held-out slice
of the catalog that training never saw: one photo of each product that has three or more, or,
in a catalog of one image a product, augmented views drawn with another seed. The adapted
embedding is kept only where it finds the right product more often than the frozen one
(``benchmarks/bench_retrieval.py`` prints what it gains).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from catalens.indexer.backbones import get_backbone
from catalens.indexer.features import l2_normalise
from catalens.indexer.features.adapted_model import AdaptedTop, FrozenTrunk, steps_for
from catalens.indexer.features.colour import ColourPreparer
from catalens.indexer.features.decode import iter_prepared
from catalens.indexer.features.deep import DeepPreparer
from catalens.indexer.features.deep_ft import ADAPTED_NETWORK, FEATURE_NAME, AdaptedDeep
from catalens.indexer.files import replaced_file
from catalens.indexer.imageio import ImageSource
from catalens.indexer.stores import mostly_one_image, product_of, stack_rows
from catalens.indexer.training import augment
from catalens.indexer.training.pseudo_labels import (
    beside_colour,
    name_shop_photos,
    product_prototypes,
    select_pseudo_labels,
    toward_shop_photos,
)

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog

log = logging.getLogger(__name__)

# Augmented views per image: a product with several photos has its variety already (a packshot
# among them gets a few more, pasted into scenes); a product with one image, a packshot
# typically, has only what augmentation makes of it.
PHOTO_VIEWS, PACKSHOT_VIEWS, SINGLE_VIEWS = 4, 8, 64
# Share of training samples drawn from an item's clean view and its mirror image.
CLEAN_SHARE = 0.25
# Keep the adapted embedding where it gains at least this on the held-out slice.
MIN_GAIN = 0.005
# Share of each product's photos (of products with three or more) that training never sees: they
# judge the adapted network, and the match calibration is fitted on them (photos the network
# trained on are named surer than any shop photo will be). A held-out photo takes its
# near-duplicates (shots of one session, cosine >= NEAR_DUPLICATE) out with it.
HELD_OUT_SHARE = 0.1
NEAR_DUPLICATE = 0.8
# Self-training on unlabeled photos: per round, the surest share of each product's photos is
# trained on under the product it was taken for (a round with a better network keeps more).
PSEUDO_SHARES = (0.5, 0.8)
# Augmented views of each unlabeled photo beside its clean crop and mirror image.
UNLABELED_VIEWS = 2
# Share of training draws that are pseudo-labelled photos (the rest: the catalog's own views).
UNLABELED_SHARE = 0.5
# Unlabeled photos are named by the adapted rows with each image's colour histogram beside them,
# at this weight (``pseudo_labels.beside_colour``): the fruit and vegetables the network confuses
# most differ in colour. Measured in docs/search-quality.md ("Naming with colour").
NAMING_COLOUR_WEIGHT = 0.3
# After self-training, each item's row moves toward the mean of its product's surest shop photos
# (``toward_shop_photos``): the surest SHOP_PHOTO_SHARE of them, the item's own row weighing
# OWN_ROW_WEIGHT (measured in docs/search-quality.md, "The catalog's rows move toward the shop's
# photos").
SHOP_PHOTO_SHARE = 0.5
OWN_ROW_WEIGHT = 0.3
# In a catalog of packshots, the share of each product's shop photos kept for search to score the
# product by (``_keep_shop_exemplars``), named by the moved rows: the surest 80%, as the last
# round of self-training keeps.
EXEMPLAR_SHARE = 0.8


# --- the views


def is_packshot(image: Image.Image) -> bool:
    """A product photographed on white: most of the image's border is near-white."""
    array = np.asarray(image.convert("RGB").resize((64, 64)))
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    return float(((border.min(axis=1) > 225) & (np.ptp(border, axis=1) < 25)).mean()) >= 0.5


class AugmentedViews:
    """An image to prepared squares (uint8 HWC): its clean crop, its mirror, then ``photo_views``
    augmented views of a photo or ``packshot_views`` of a packshot; runs in decode workers. Views
    are seeded by the image's content, so a repeated run draws the same ones."""

    def __init__(self, preparer: DeepPreparer, photo_views: int, packshot_views: int, seed: int, cutouts: list,
                 photos: list[Image.Image]):
        self.preparer, self.photo_views, self.packshot_views, self.seed = preparer, photo_views, packshot_views, seed
        self.cutouts, self.photos = cutouts, photos

    def square(self, image: Image.Image) -> np.ndarray:
        """What the preparer makes of ``image``, back in uint8 (the float copy is 4x the memory)."""
        chw = self.preparer(image)
        pixels = (chw.transpose(1, 2, 0) * self.preparer.std + self.preparer.mean) * 255.0
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """(clean crop and mirror as the network's float16 input (2, 3, S, S), augmented squares uint8)."""
        thumb = np.asarray(image.resize((32, 32))).tobytes()
        rng = np.random.default_rng([self.seed, zlib.crc32(thumb)])
        # The clean views exactly as indexing prepares them: the item's row must not depend on
        # whether it was embedded here or by a later indexing run.
        crop = self.preparer(image)
        clean = np.stack([crop, np.ascontiguousarray(crop[:, :, ::-1])])
        packshot = is_packshot(image)
        product = augment.cutout(image) if packshot else None
        others = self.cutouts or ([product] if product is not None else [])
        squares = []
        for _ in range(self.packshot_views if packshot else self.photo_views):
            view = (augment.packshot_view(rng, image, product, others, self.photos) if packshot
                    else augment.photo_view(rng, image))
            squares.append(self.square(view))
        size = clean.shape[-1]
        return clean.astype(np.float16), np.stack(squares) if squares else np.zeros((0, size, size, 3), np.uint8)


class ViewMaps:
    """``AugmentedViews`` in the decode workers, the frozen trunk on each view in ``finish``."""

    def __init__(self, views: AugmentedViews, trunk: FrozenTrunk):
        self.preparer, self.trunk = views, trunk
        self.draft_size = trunk.draft_size

    def finish(self, prepared: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        mean, std = self.preparer.preparer.mean, self.preparer.preparer.std
        out = []
        for clean, squares in prepared:
            augmented = ((squares.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)
            batch = np.concatenate([clean.astype(np.float32), augmented])
            out.append(self.trunk.maps(np.ascontiguousarray(batch)).astype(np.float16))
        return out


# --- the job


@dataclass
class AdaptationReport:
    """What ``catalens finetune`` did and measured."""

    items: int
    products: int
    views: int
    steps: int
    held_out: int
    held_out_kind: str
    frozen_accuracy: float
    adapted_accuracy: float
    kept: bool
    seconds: float
    unlabeled: int = 0  # unlabeled photos read (--unlabeled)
    pseudo_labelled: int = 0  # of those, trained on under the product they were taken for
    toward_shop_photos: int = 0  # products whose items' rows moved toward their shop photos
    colour_moved: bool = False  # the items' colour rows moved toward the same photos too
    shop_exemplars: int = 0  # shop photos kept for search to score their products by (a catalog of packshots)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _sample_backgrounds(catalog: Any, records: Sequence, rng: np.random.Generator, limit: int = 24
                        ) -> tuple[list, list[Image.Image]]:
    """Cut-outs of some of the catalog's packshots (clutter around a pasted product) and some of its
    photos (scenes to paste onto), decoded once here and handed to the decode workers."""
    from catalens.indexer.imageio import ImageDecodeError, load_rgb

    cutouts, photos = [], []
    for position in rng.permutation(len(records))[: 3 * limit]:
        try:
            image = load_rgb(records[position].image, catalog.config.max_pixels, draft_size=512)
        except ImageDecodeError:
            continue
        image.thumbnail((384, 384))
        if is_packshot(image) and len(cutouts) < limit:
            cutouts.append(augment.cutout(image))
        elif not is_packshot(image) and len(photos) < limit:
            photos.append(image)
    return cutouts, photos


def _held_out_slice(catalog: Any, records: Sequence, labels: np.ndarray, rng: np.random.Generator) -> set[int]:
    """Positions of the photos training never sees: about ``HELD_OUT_SHARE`` of each product with
    three or more photos (at least one, and never all but one), a photo always with its
    near-duplicates in the frozen descriptor.

    Photos with the fewest near-duplicates go first. A photo of a long burst takes the whole burst
    out with it: drawn at random, the tenth of each product came to 28% of grocery's photos (773 of
    2,721), and training on 72% of them cost 1.7 points of val top-1 in ``deep_ft`` and 2.7 in
    fused search (Fruit 9) against training on all."""
    vectors: dict[int, np.ndarray] = {}
    if "deep" in catalog.dims():
        found, rows = stack_rows(catalog.items.rows("deep"), catalog.dims()["deep"])
        vectors = dict(zip(found.tolist(), l2_normalise(rows), strict=True))
    held: set[int] = set()
    for product in np.unique(labels):
        members = np.flatnonzero(labels == product)
        if len(members) < 3:
            continue
        target, cap = max(1, round(HELD_OUT_SHARE * len(members))), len(members) - 2
        twins: dict[int, set[int]] = {}
        for position in members.tolist():
            own = vectors.get(records[position].key)
            twins[position] = {int(m) for m in members if m == position or (
                own is not None and records[m].key in vectors and float(vectors[records[m].key] @ own) >= NEAR_DUPLICATE)}
        chosen: set[int] = set()
        for position in sorted(rng.permutation(members).tolist(), key=lambda p: len(twins[p])):
            if len(chosen) >= target:
                break
            if len(chosen | twins[position]) <= cap:
                chosen |= twins[position]
        held |= chosen
    return held


def _view_maps(catalog: Any, sources: Sequence, views: AugmentedViews, trunk: FrozenTrunk, progress: bool,
               desc: str, colours: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Trunk maps of every view of each image in ``sources`` ((2 + views, C, H, W) each), by its
    position there; unreadable ones are left out, with a warning naming them."""
    from tqdm import tqdm

    transform = ViewMaps(views, trunk)
    found: dict[int, np.ndarray] = {}
    with tqdm(total=len(sources), unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        # Few images a batch: an image's views are up to 66 squares of the network input.
        preparers: dict[str, Any] = {"views": transform.preparer}
        if colours is not None:
            preparers["colour"] = ColourPreparer()
        for batch in iter_prepared(list(sources), preparers, batch_size=4,
                                   num_workers=catalog.config.num_workers, max_pixels=catalog.config.max_pixels,
                                   draft_size=transform.draft_size):
            for row, maps in zip(batch.positions, transform.finish(batch.prepared["views"]), strict=True):
                found[row] = maps
            if colours is not None:
                for row, histogram in zip(batch.positions, batch.prepared["colour"], strict=True):
                    colours[row] = np.asarray(histogram, np.float32)
            for error in batch.errors.values():
                log.warning("finetune: skipped %s", error)
            bar.update(len(batch.positions) + len(batch.errors))
    return found


def _item_view_maps(catalog: Any, records: Sequence, positions: list[int], views: AugmentedViews,
                    trunk: FrozenTrunk, progress: bool, desc: str, colours: dict[int, np.ndarray] | None = None
                    ) -> dict[int, np.ndarray]:
    """``_view_maps`` of the catalog items at ``positions``, by position in ``records`` (and
    their colour histograms into ``colours``, by position, where it is given)."""
    found_colours: dict[int, np.ndarray] | None = None if colours is None else {}
    found = _view_maps(catalog, [records[p].image for p in positions], views, trunk, progress, desc, found_colours)
    if colours is not None and found_colours is not None:
        colours.update({positions[row]: histogram for row, histogram in found_colours.items()})
    return {positions[row]: maps for row, maps in found.items()}


def _nearest_product_accuracy(catalog_rows: np.ndarray, catalog_labels: np.ndarray, query_rows: np.ndarray,
                              query_labels: np.ndarray) -> float:
    if not len(query_rows):
        return float("nan")
    nearest = (l2_normalise(query_rows) @ l2_normalise(catalog_rows).T).argmax(axis=1)
    return float((catalog_labels[nearest] == query_labels).mean())


def _frozen_pooled(trunk: FrozenTrunk, backbone: str, maps: np.ndarray, pretrained: bool = True) -> np.ndarray:
    """The frozen network's descriptor of views given as trunk maps (the rest of its stages, pooled)."""
    network = get_backbone(backbone).create(pretrained=pretrained)
    rest = nn.Sequential(*network.stages()[trunk.first_stage:])
    with torch.inference_mode():
        rows = [network.forward_head(rest(torch.from_numpy(np.asarray(maps[i : i + 128], np.float32)))).numpy()
                for i in range(0, len(maps), 128)]
    return l2_normalise(np.concatenate(rows))


def _self_train(model: AdaptedTop, training: np.ndarray, row_labels: Sequence[str], weights: np.ndarray,
                item_maps: np.ndarray, item_labels: np.ndarray, photos: np.ndarray, steps: int | None,
                progress: bool, seed: int, item_colour: np.ndarray | None = None,
                photo_colour: np.ndarray | None = None) -> tuple[AdaptedTop, int]:
    """Rounds of self-training: name the unlabeled photos with the network so far, keep the surest
    share of each product's (``PSEUDO_SHARES``), and train the top stages afresh on the catalog's
    views and those photos' views. Returns the last network and how many photos it trained on.

    ``item_maps`` (n, 2, C, H, W) and ``item_labels``: the training items' clean views and
    products, whose adapted embeddings are the products' prototypes; ``photos`` (m, 2 + views, C,
    H, W): the unlabeled photos' clean views and augmented ones. ``item_colour`` and
    ``photo_colour``: their colour histograms, which the photos are named by beside the adapted
    rows where both are given."""
    if not len(photos):
        return model, 0
    products = np.unique(item_labels)
    labelled_total = float(np.sum(weights))
    kept = 0
    for share in PSEUDO_SHARES:
        embedded = model.transform(item_maps)
        _, prototypes = product_prototypes(embedded, item_labels)
        photo_rows = model.transform(photos[:, :2])
        if item_colour is not None and photo_colour is not None:
            prototypes = beside_colour(prototypes, product_prototypes(item_colour, item_labels)[1],
                                       NAMING_COLOUR_WEIGHT)
            photo_rows = beside_colour(photo_rows, photo_colour, NAMING_COLOUR_WEIGHT)
        chosen = select_pseudo_labels(photo_rows, prototypes, share)
        kept = len(chosen.rows)
        views = photos.shape[1]
        extra = photos[chosen.rows].reshape(-1, *photos.shape[2:])
        extra_labels = np.repeat(products[chosen.labels], views)
        # Each kept photo weighs as much as any other; together they are UNLABELED_SHARE of the draws.
        extra_weight = labelled_total * UNLABELED_SHARE / (1 - UNLABELED_SHARE) / max(len(extra), 1)
        log.info("finetune: self-training on %d of %d unlabeled photos (share %.2f)", kept, len(photos), share)
        model = AdaptedTop(model.backbone, model.first_stage_, steps=steps or steps_for(len(item_maps) + kept),
                           seed=seed, progress=progress).fit(
            np.concatenate([training, extra]), [*row_labels, *extra_labels.tolist()],
            np.concatenate([weights, np.full(len(extra), extra_weight)]))
    return model, kept


def adapt_catalog(catalog: Catalog, steps: int | None = None, progress: bool = True, seed: int = 0,
                  unlabeled: Sequence[ImageSource] = ()) -> AdaptationReport:
    """Train the adapted embedding on the catalog, check it on a held-out slice, keep it where it helps.

    Kept, it becomes the catalog's ``deep_ft`` feature (every item's row now, new items' at
    indexing), which search and classification use in place of ``deep``; not kept, an earlier
    one is removed and ``deep`` serves. Either way the report says what was measured.

    ``unlabeled``: the shop's own photos, without labels; the network is then trained again on
    those it can name surely (``_self_train``), which teaches it what the shop's photos look like,
    and each item's stored row, and its colour row, moves toward its product's surest photos
    (``toward_shop_photos``). Items indexed later get the network's row and their own colour
    until the next finetune. In a catalog of packshots the network also keeps the photos it named
    surest, which search scores those products by (``_keep_shop_exemplars``).
    """
    run = _FinetuneRun(catalog, steps, seed, unlabeled)
    ADAPTED_NETWORK.refit(catalog, force=True, progress=progress, fit=run.fit, save=run.commit)
    log.info("finetune: %s", run.report)
    return run.report


def _train(catalog: Catalog, steps: int | None, progress: bool, seed: int, unlabeled: Sequence[ImageSource]
           ) -> _Trained:
    """Train the adapted network and judge it on the held-out slice."""
    started = time.perf_counter()
    config = catalog.config
    records = sorted(catalog.items.records().values(), key=lambda record: record.id)  # one catalog, one model
    labels = np.array([product_of(record) for record in records], dtype=str)
    products, counts = np.unique(labels, return_counts=True)
    if len(products) < 2:
        raise ValueError(f"{catalog.location}: adapting needs at least two products (the 'product' attribute or the "
                         "leaf category tells them apart)")
    rng = np.random.default_rng(seed)
    count_of = dict(zip(products.tolist(), counts.tolist(), strict=True))
    held = _held_out_slice(catalog, records, labels, rng)
    held_kind = "photos" if len({labels[i] for i in held}) >= max(5, 0.2 * len(products)) else "views"
    if held_kind == "views":
        held = set()

    trunk = FrozenTrunk(config.backbone, scaling=config.input_scaling)
    cutouts, photos = _sample_backgrounds(catalog, records, rng)
    many = [i for i in range(len(records)) if count_of[labels[i]] > 1]
    single = [i for i in range(len(records)) if count_of[labels[i]] == 1]
    maps: dict[int, np.ndarray] = {}
    # The items' colour histograms, read with their views: the shop's photos are named with them,
    # and the items' colour rows move toward those photos as their deep rows do.
    colours: dict[int, np.ndarray] | None = {} if "colour" in config.features else None
    if many:
        views = AugmentedViews(trunk.preparer, PHOTO_VIEWS, PACKSHOT_VIEWS, seed, cutouts, photos)
        maps.update(_item_view_maps(catalog, records, many, views, trunk, progress,
                                    "views of products with several photos", colours))
    if single:
        views = AugmentedViews(trunk.preparer, SINGLE_VIEWS, SINGLE_VIEWS, seed, cutouts, photos)
        maps.update(_item_view_maps(catalog, records, single, views, trunk, progress,
                                    "views of products with one image", colours))
    positions = sorted(maps)
    if not positions:
        raise ValueError(f"{catalog.location}: none of the items' images could be read")

    rows, row_labels, weights = [], [], []
    for position in positions:
        if position in held:
            continue
        item_maps = maps[position]
        augmented = len(item_maps) - 2
        rows.append(item_maps)
        row_labels.extend([labels[position]] * len(item_maps))
        clean = CLEAN_SHARE / 2 if augmented else 0.5
        weights.extend([clean, clean] + [(1 - CLEAN_SHARE) / augmented] * augmented)
    training = np.concatenate(rows)
    model = AdaptedTop(config.backbone, trunk.first_stage, steps=steps or steps_for(len(positions)), seed=seed,
                       progress=progress).fit(training, row_labels, np.asarray(weights))
    clean_maps = np.stack([maps[position][:2] for position in positions])
    pseudo_labelled = 0
    shop_photos = np.zeros((0, 2 + UNLABELED_VIEWS, *clean_maps.shape[2:]), clean_maps.dtype)
    item_colour = None if colours is None else l2_normalise(np.stack([colours[p] for p in positions]))
    photo_colour = None
    if unlabeled:
        photo_colours: dict[int, np.ndarray] = {}
        photo_maps = _view_maps(catalog, list(unlabeled), AugmentedViews(trunk.preparer, UNLABELED_VIEWS,
                                UNLABELED_VIEWS, seed, cutouts, photos), trunk, progress, "views of unlabeled photos",
                                None if item_colour is None else photo_colours)
        if photo_maps:
            shop_photos = np.stack([photo_maps[row] for row in sorted(photo_maps)])
            if item_colour is not None:
                photo_colour = l2_normalise(np.stack([photo_colours[row] for row in sorted(photo_maps)]))
        del photo_maps
        trained = np.array([position not in held for position in positions])
        model, pseudo_labelled = _self_train(
            model, training, row_labels, np.asarray(weights), clean_maps[trained], labels[positions][trained],
            shop_photos, steps, progress, seed, None if item_colour is None else item_colour[trained], photo_colour)
    del training, rows
    adapted = model.transform(clean_maps)
    keys = np.array([records[position].key for position in positions], np.int64)
    item_labels = labels[positions]
    # What search stores: the network's rows, moved toward the shop's photos where there are some.
    # Whether the network is kept is judged on its own rows below.
    photo_rows = model.transform(shop_photos[:, :2])
    del shop_photos
    stored, colour_rows, moved_products = _moved_rows(adapted, item_colour, item_labels, photo_rows, photo_colour)
    if len(photo_rows) and mostly_one_image(labels):
        _keep_shop_exemplars(model, stored, item_labels, photo_rows)

    # The frozen network's own descriptors of the same crops: what search uses without adaptation.
    frozen = _frozen_pooled(trunk, config.backbone, clean_maps[:, 0])
    if held_kind == "photos":
        is_held = np.array([position in held for position in positions])
        held_count = int(is_held.sum())
        frozen_accuracy = _nearest_product_accuracy(frozen[~is_held], item_labels[~is_held], frozen[is_held],
                                                    item_labels[is_held])
        adapted_accuracy = _nearest_product_accuracy(adapted[~is_held], item_labels[~is_held], adapted[is_held],
                                                     item_labels[is_held])
    else:
        # No second photo of a product: augmented views drawn with another seed, never trained on.
        chosen = [positions[i] for i in rng.permutation(len(positions))[:200]]
        probe = _item_view_maps(catalog, records, chosen, AugmentedViews(trunk.preparer, 2, 2, seed + 1, cutouts, photos),
                           trunk, progress, "held-out views")
        query_maps = np.concatenate([probe[p][2:] for p in chosen if p in probe])
        query_labels = np.concatenate([[labels[p]] * (len(probe[p]) - 2) for p in chosen if p in probe])
        held_count = len(query_maps)
        frozen_accuracy = _nearest_product_accuracy(frozen, item_labels, _frozen_pooled(trunk, config.backbone, query_maps),
                                                    query_labels)
        adapted_accuracy = _nearest_product_accuracy(adapted, item_labels, model.embed_views(query_maps), query_labels)
    kept = bool(adapted_accuracy >= frozen_accuracy + MIN_GAIN)
    colour_moved = kept and photo_colour is not None and moved_products > 0
    # Which items it learnt from: the match calibration asks only the others (and items added later).
    model.trained_keys_ = np.array(sorted(records[p].key for p in positions if p not in held), np.int64)
    report = AdaptationReport(
        items=len(positions), products=len(products), views=int(sum(len(maps[p]) for p in positions)),
        steps=model.n_steps_, held_out=held_count, held_out_kind=held_kind, frozen_accuracy=frozen_accuracy,
        adapted_accuracy=adapted_accuracy, kept=kept, seconds=round(time.perf_counter() - started, 1),
        unlabeled=len(unlabeled), pseudo_labelled=pseudo_labelled, toward_shop_photos=moved_products,
        colour_moved=colour_moved, shop_exemplars=len(getattr(model, "exemplar_products_", [])))
    # A network not kept names no photo: the items keep their own colour.
    return _Trained(model, report, keys, stored, item_colour if not colour_moved else colour_rows)


def _moved_rows(adapted: np.ndarray, item_colour: np.ndarray | None, item_labels: np.ndarray,
                photo_rows: np.ndarray, photo_colour: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The items' adapted rows and colour rows, each moved toward its product's surest shop photos
    (named once, by both beside each other where the colour is given; ``toward_shop_photos``), and
    how many products had photos. Without photos, the rows as they are."""
    if not len(photo_rows):
        return adapted, item_colour, 0
    coloured = item_colour is not None and photo_colour is not None
    naming = ((beside_colour(adapted, item_colour, NAMING_COLOUR_WEIGHT),
               beside_colour(photo_rows, photo_colour, NAMING_COLOUR_WEIGHT)) if coloured else (adapted, photo_rows))
    named = name_shop_photos(naming[0], item_labels, naming[1], SHOP_PHOTO_SHARE)
    moved, products = toward_shop_photos(adapted, item_labels, photo_rows, named, OWN_ROW_WEIGHT)
    colour = item_colour
    if coloured:
        colour, _ = toward_shop_photos(item_colour, item_labels, photo_colour, named, OWN_ROW_WEIGHT)
    return moved, colour, products


def _keep_shop_exemplars(model: AdaptedTop, item_rows: np.ndarray, item_labels: np.ndarray,
                         photo_rows: np.ndarray) -> None:
    """Keep with the network the shop photos named surest (``EXEMPLAR_SHARE`` of each product's,
    named by the items' stored rows) and each one's product: search then scores a product by
    its nearest shop photos (``search.retrieval.exemplar_cosines``).

    One packshot stands for a product that the shop photographs in many ways (one apple, a
    crate, a bag); the mean of its photos (``toward_shop_photos``) is one more point, between
    them. The photos themselves keep each way, and a query finds the product through the ones
    like it. Measured on a catalog of packshots only (docs/search-quality.md, "Products scored
    by the shop's photos")."""
    named = name_shop_photos(item_rows, item_labels, photo_rows, EXEMPLAR_SHARE)
    model.exemplars_ = np.asarray(photo_rows[named.rows], np.float32)
    model.exemplar_products_ = np.unique(item_labels)[named.labels]


@dataclass(frozen=True)
class _Trained:
    """What ``_train`` made: the network, its report, and the rows of the items it embedded (by
    ``keys``) as search stores them: ``rows`` for ``deep_ft``, ``colour`` for ``colour`` (None
    where the index has no colour feature)."""

    model: AdaptedTop
    report: AdaptationReport
    keys: np.ndarray
    rows: np.ndarray
    colour: np.ndarray | None


@dataclass
class _FinetuneRun:
    """One ``finetune``: its fit (``_train``; a network not kept takes ``deep_ft`` off and the fit
    returns None, so the slot removes the stored one), and the commit of a kept network with the
    rows it made."""

    catalog: Catalog
    steps: int | None
    seed: int
    unlabeled: Sequence[ImageSource]
    report: AdaptationReport | None = None
    trained: _Trained | None = None
    features: list[str] = field(default_factory=list)
    previous: dict[str, Any] | None = None

    def fit(self, catalog: Catalog, progress: bool) -> AdaptedDeep | None:
        self.trained = trained = _train(catalog, self.steps, progress, self.seed, self.unlabeled)
        model, self.report = trained.model, trained.report
        self.features, self.previous = list(catalog.config.features), catalog.meta.get("adaptation")
        catalog.meta["adaptation"] = self.report.to_json()
        if self.report.kept:
            return AdaptedDeep(ADAPTED_NETWORK.path(catalog), catalog.config.input_scaling, catalog.config.runtime,
                               model)
        # Disabled first, then its rows and model go: a failure on the way never leaves
        # ``deep_ft`` enabled without its rows or its model.
        with catalog.lock:
            catalog.config.features = [name for name in self.features if name != FEATURE_NAME]
            try:
                catalog.save()
            except BaseException:
                self._put_back()
                raise
            catalog.items.delete_feature(FEATURE_NAME)
            self._store_colour()
        return None

    def commit(self, adapted: AdaptedDeep, path: Path) -> None:
        """The model file, then the rows it made, with the feature enabled in the one save that
        follows them: a failure (a full disk) before the rows are committed puts the previous
        model back, so ``deep_ft`` is never enabled with a model its rows were not made by."""
        catalog = self.catalog
        with catalog.lock, replaced_file(path) as replacement:
            try:
                adapted.model.save(path)
                if FEATURE_NAME not in catalog.config.features:
                    catalog.config.features = [*catalog.config.features, FEATURE_NAME]
                catalog.replace_feature(FEATURE_NAME, self.trained.keys, self.trained.rows,
                                        committed=replacement.committed)
            except BaseException:
                if not replacement.done:
                    self._put_back()
                raise
            self._store_colour()

    def _store_colour(self) -> None:
        """The items' colour rows moved toward the shop's photos, or their own put back where the
        finetune before moved them and this one does not; items whose image it could not read
        keep the row they have. Unmoved rows, where none were moved before, are left as indexed."""
        trained = self.trained
        moved_before = bool((self.previous or {}).get("colour_moved"))
        if trained.colour is None or not (trained.report.colour_moved or moved_before):
            return
        rows = self.catalog.items.rows("colour")
        rows.update({int(key): row.tobytes() for key, row in zip(trained.keys, trained.colour.astype(np.float32),
                                                                  strict=True)})
        self.catalog.replace_feature("colour", *stack_rows(rows, trained.colour.shape[1]))

    def _put_back(self) -> None:
        """What this process holds, where nothing was committed."""
        self.catalog.config.features = self.features
        self.catalog.meta.pop("adaptation", None)
        if self.previous is not None:
            self.catalog.meta["adaptation"] = self.previous
