"""Typed errors. Every message says what was wrong with the input and what to do about it."""

from __future__ import annotations


class EchoError(Exception):
    """Base class of every error raised by echo-agent."""


class EchoInputError(EchoError, ValueError):
    """The input (image, context, manifest row, argument) is not usable."""


class UnreadableImageError(EchoInputError):
    """The file or bytes could not be decoded as an image (corrupt, truncated or not an image)."""


class UnsupportedFormatError(EchoInputError):
    """The input is an image type or container that echo-agent does not read."""


class ImageTooSmallError(EchoInputError):
    """The image is empty or smaller than the minimum usable size."""


class ImageTooLargeError(EchoInputError):
    """The image exceeds the pixel limit (guards against decompression bombs)."""


class ChannelLayoutError(EchoInputError):
    """The array's shape or channel count cannot be interpreted as a grayscale or RGB(A) image."""


class DicomError(EchoInputError):
    """A DICOM file lacks pixel data, or the requested frame does not exist."""


class ClinicalContextError(EchoInputError):
    """The clinical context has an unknown key or an invalid value."""


class UnknownOrganError(EchoInputError):
    """The organ is not registered, or the image could not be routed to a registered organ."""


class ManifestError(EchoInputError):
    """A dataset manifest row is invalid; the message names the row."""


class ModelLoadError(EchoError, RuntimeError):
    """Model weights are missing or cannot be loaded by the chosen backend."""


class MissingExtraError(EchoError, ImportError):
    """An optional dependency is needed; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str = "") -> None:
        what = f" for {purpose}" if purpose else ""
        super().__init__(
            f"{package} is needed{what} but is not installed; install it with "
            f"`pip install 'echo-agent[{extra}]'`."
        )
        self.package = package
        self.extra = extra


class OutputPathError(EchoError, OSError):
    """An output file or folder cannot be created or written (permissions, a file where a folder is
    expected, a full disk); the message names the path. Raised before any work when checkable."""


class ToolBudgetExceeded(EchoError):
    """Raised inside a tool call that arrives after the run's tool-call budget is spent."""


class ReasonerOutputError(EchoError, ValueError):
    """A reasoner's output could not be parsed into tool calls or a Diagnosis."""


__all__ = [
    "ChannelLayoutError",
    "ClinicalContextError",
    "DicomError",
    "EchoError",
    "EchoInputError",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "ManifestError",
    "MissingExtraError",
    "ModelLoadError",
    "OutputPathError",
    "ReasonerOutputError",
    "ToolBudgetExceeded",
    "UnknownOrganError",
    "UnreadableImageError",
    "UnsupportedFormatError",
]
