"""The invoke-and-reason graph."""

from .build import PARSE_ERROR_KEY, Finalizer, build_graph, diagnosis_from_state
from .review import ReviewDecision, apply_review
from .state import EchoInput, EchoOutput, EchoRunContext, EchoState, typed_evidence

__all__ = [
    "PARSE_ERROR_KEY",
    "EchoInput",
    "EchoOutput",
    "EchoRunContext",
    "EchoState",
    "Finalizer",
    "ReviewDecision",
    "apply_review",
    "build_graph",
    "diagnosis_from_state",
    "typed_evidence",
]
