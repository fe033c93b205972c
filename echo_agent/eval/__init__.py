"""Datasets, manifests, leakage-safe splits and evaluation."""

from .manifest import MANIFEST_COLUMNS, ManifestImage, default_data_root, load_manifest, write_manifest

__all__ = ["MANIFEST_COLUMNS", "ManifestImage", "default_data_root", "load_manifest", "write_manifest"]
