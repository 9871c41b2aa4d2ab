"""Reading product catalogs (folder trees and JSONL manifests) into `CatalogItem`s."""

from catalens.datasets.catalog import (
    IMAGE_SUFFIXES,
    CatalogError,
    CatalogItem,
    load_catalog,
    read_folder_tree,
    read_manifest,
    write_manifest,
)
from catalens.datasets.photos import read_photo_list

__all__ = [
    "IMAGE_SUFFIXES",
    "CatalogError",
    "CatalogItem",
    "load_catalog",
    "read_folder_tree",
    "read_manifest",
    "read_photo_list",
    "write_manifest",
]
