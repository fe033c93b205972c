"""Datasets, manifests, leakage-safe splits and evaluation."""

from .datasets import (
    BREAST_LESIONS_USG,
    BUSI,
    HYDRONEPHROSIS_NCNU,
    DatasetBuild,
    load_center,
    load_split,
)
from .manifest import MANIFEST_COLUMNS, ManifestImage, default_data_root, load_manifest, write_manifest
from .splits import LeakageError, LeakageReport, apply_splits, assign_splits, leakage_report

__all__ = [
    "BREAST_LESIONS_USG",
    "BUSI",
    "HYDRONEPHROSIS_NCNU",
    "MANIFEST_COLUMNS",
    "DatasetBuild",
    "LeakageError",
    "LeakageReport",
    "ManifestImage",
    "apply_splits",
    "assign_splits",
    "default_data_root",
    "leakage_report",
    "load_center",
    "load_manifest",
    "load_split",
    "write_manifest",
]
