"""camx: class activation maps for image models, in batches, from the command line.

The public Python face (for notebooks and programs) is :func:`explain` and
:func:`load_model`; they are defined in :mod:`cam_cli.api`, which is imported on
first use so that ``import cam_cli`` (and ``camx --help``) stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from cam_cli.api import MethodMaps, explain, load_model

__all__ = ["MethodMaps", "__version__", "explain", "load_model"]


def __getattr__(name: str) -> Any:
    if name in ("explain", "load_model", "MethodMaps"):
        from cam_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'cam_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
