"""Datasets, manifests, leakage-safe splits and evaluation."""

from .datasets import (
    BREAST_LESIONS_USG,
    BUSI,
    HYDRONEPHROSIS_NCNU,
    DatasetBuild,
    load_center,
    load_split,
)
from .from_folder import FolderManifest, boxes_from_mask, manifest_from_folder
from .manifest import (
    MANIFEST_COLUMNS,
    ManifestImage,
    column_values,
    default_data_root,
    load_manifest,
    write_manifest,
)
from .splits import LeakageError, LeakageReport, apply_splits, assign_splits, leakage_report

# The harness and metrics load on first use (they pull in the agent stack).
_LAZY = {
    "evaluate": ".harness", "eval_command": ".harness", "EvalResult": ".harness", "OrganMetrics": ".harness",
    "compute_metrics": ".metrics", "SystemMetrics": ".metrics", "ScoredImage": ".metrics",
    "PredictedBox": ".metrics", "match_boxes": ".metrics",
}


def __getattr__(name: str):  # noqa: ANN202
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EvalResult",
    "OrganMetrics",
    "PredictedBox",
    "ScoredImage",
    "SystemMetrics",
    "compute_metrics",
    "eval_command",
    "evaluate",
    "match_boxes",
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
    "FolderManifest",
    "boxes_from_mask",
    "manifest_from_folder",
    "column_values",
    "default_data_root",
    "leakage_report",
    "load_center",
    "load_manifest",
    "load_split",
    "write_manifest",
]
