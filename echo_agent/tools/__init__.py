"""Typed LangChain tools over the detectors and the evidence layer."""

from .builders import (
    ClassifyArgs,
    DescribeArgs,
    DetectArgs,
    RetrieveArgs,
    make_classify_tool,
    make_describe_tool,
    make_detect_tool,
    make_retrieve_tool,
    make_tools,
    next_evidence_id,
    regions_to_boxes,
)
from .toolkit import Captioner, Retriever, Toolkit, classify_regions, run_classifier, run_detector

__all__ = [
    "Captioner",
    "ClassifyArgs",
    "DescribeArgs",
    "DetectArgs",
    "Retriever",
    "RetrieveArgs",
    "Toolkit",
    "classify_regions",
    "make_classify_tool",
    "make_describe_tool",
    "make_detect_tool",
    "make_retrieve_tool",
    "make_tools",
    "next_evidence_id",
    "regions_to_boxes",
    "run_classifier",
    "run_detector",
]
