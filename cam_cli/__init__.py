"""camx: class activation maps for image classifiers, in batches, from the command line."""

from __future__ import annotations

__version__ = "0.1.0"
