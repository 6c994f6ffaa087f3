"""Exceptions raised by camx's library code.

The library never prints: it raises one of these, and the CLI turns it into a
one-line message and an exit status (``CamxError.exit_code``).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence


class CamxError(Exception):
    """Base class: a fatal, user-facing error with a one-line message."""

    exit_code = 1


class InputError(CamxError):
    """No images found, an unreadable list of files, clashing inputs."""


class ModelError(CamxError):
    """Unknown model, unknown layer, a head that a method cannot use."""


class WeightsError(CamxError):
    """Weights that cannot be found, downloaded, read or matched to the model."""


class DeviceError(CamxError):
    """A device that is not present or not usable."""


class OutputError(CamxError):
    """The output folder cannot be created or written."""


class DecodeError(Exception):
    """One input could not be turned into an image (not fatal to the run)."""


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``count`` and ``noun`` agreeing: ``1 image``, ``2 images`` (``nouns``: an irregular plural)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``exc``'s message on one line, cut to ``limit`` characters (ending ``...`` when cut)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def suggest(name: str, choices: Sequence[str]) -> str:
    """`` (did you mean a, b, c?)`` with up to three close names, or nothing."""
    close = difflib.get_close_matches(name, choices, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""
