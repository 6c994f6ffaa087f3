"""Progress on stderr, for ``explain`` and ``evaluate``.

On a terminal, tqdm's bar. Anywhere else (cron, a log file, CI) a plain line every
``CAMX_PROGRESS_EVERY`` seconds (30 by default) and one at the end, each with the
count, the total, the rate and the time left; never a carriage return, so that
the ``camx: failed:`` lines stand on lines of their own. Nothing is shown before
``start``: a run that fails while it opens its outputs prints its error alone.
"""

from __future__ import annotations

import math
import os
import sys
import time
from types import TracebackType
from typing import Any, TextIO

EVERY_VARIABLE = "CAMX_PROGRESS_EVERY"
DEFAULT_EVERY = 30.0


def progress_every() -> float:
    """Seconds between two plain progress lines: ``$CAMX_PROGRESS_EVERY``, else 30."""
    try:
        seconds = float(os.environ.get(EVERY_VARIABLE) or DEFAULT_EVERY)
    except ValueError:
        return DEFAULT_EVERY
    return seconds if math.isfinite(seconds) and seconds >= 0 else DEFAULT_EVERY


def duration(seconds: float) -> str:
    """``seconds`` as ``M:SS`` or ``H:MM:SS``."""
    whole = max(0, int(round(seconds)))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress of ``total`` items of ``unit``, with optional forward passes counted too
    (Score-CAM, Ablation-CAM: ``passes_total`` expected); silent when ``quiet``."""

    def __init__(
        self, desc: str, total: int, unit: str, quiet: bool = False, passes_total: int | None = None,
        stream: TextIO | None = None,
    ) -> None:  # fmt: skip
        self.desc = desc
        self.total = total
        self.unit = unit
        self.quiet = quiet
        self.passes_total = passes_total
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = is_terminal(self.stream)
        self.every = progress_every()
        self.done = 0
        self.passes = 0
        self.started: float | None = None
        self._last = 0.0
        self._shown: tuple[int, int] | None = None  # (done, passes) of the last plain line
        self._bar: Any = None
        #: a few words more, shown after the counts (evaluate: its forward passes a second)
        self.note = ""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close(finished=kind is None)

    def start(self) -> None:
        """The run really began (its outputs are open): show the bar, or the first line."""
        if self.started is not None:
            return
        self.started = self._last = time.monotonic()
        if self.quiet:
            return
        if self.terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit=self.unit, file=self.stream, dynamic_ncols=True, desc=self.desc)
            self._refresh_bar()
        else:
            self._print_line()

    def update(self, count: int, note: str | None = None) -> None:
        """``count`` more items done (and the note changed, when given)."""
        self.start()
        if note is not None:
            self.note = note
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            self._refresh_bar()
        else:
            self._maybe_print()

    def add_passes(self, count: int) -> None:
        """``count`` more forward passes done."""
        self.start()
        self.passes += count
        if self._bar is not None:
            self._refresh_bar()
        else:
            self._maybe_print()

    def write(self, message: str) -> None:
        """A line of its own (a failure), above the bar on a terminal."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            self._print(message)

    def close(self, finished: bool = True) -> None:
        """Take the bar down, or print the last line (when the run started)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.started is not None and not self.quiet and finished and self._shown != (self.done, self.passes):
            self._print_line()
        self.quiet = True  # once closed, nothing more

    # -- what is shown
    def seconds_left(self) -> float | None:
        """The estimate: from the passes' rate where passes are counted, else the items'."""
        if self.started is None:
            return None
        elapsed = time.monotonic() - self.started
        if self.passes_total and self.passes > 0:
            return max(0, self.passes_total - self.passes) * elapsed / self.passes
        if self.done > 0:
            return max(0, self.total - self.done) * elapsed / self.done
        return None

    def passes_text(self) -> str:
        if self.passes_total is None:
            return ""
        elapsed = time.monotonic() - self.started if self.started is not None else 0.0
        rate = f" ({self.passes / elapsed:.1f}/s)" if elapsed > 0 and self.passes else ""
        return f"{self.passes}/{self.passes_total} forward passes{rate}"

    def line(self) -> str:
        """``DESC: DONE/TOTAL UNIT, RATE UNIT/s[, P/Q forward passes (R/s)], M:SS left, M:SS elapsed``."""
        elapsed = time.monotonic() - self.started if self.started is not None else 0.0
        parts = [f"{self.desc}: {self.done}/{self.total} {self.unit}"]
        if elapsed > 0 and self.done:
            parts.append(f"{self.done / elapsed:.2f} {self.unit}/s")
        if self.passes_total is not None:
            parts.append(self.passes_text())
        if self.note:
            parts.append(self.note)
        left = self.seconds_left()
        if self.done >= self.total:
            parts.append("done")
        elif left is not None:
            parts.append(f"{duration(left)} left")
        parts.append(f"{duration(elapsed)} elapsed")
        return ", ".join(parts)

    def _refresh_bar(self) -> None:
        parts = [self.note] if self.note else []
        if self.passes_total is not None:
            left = self.seconds_left()
            parts = [self.passes_text(), *parts, *([f"{duration(left)} left"] if left is not None else [])]
        if parts:
            self._bar.set_postfix_str(", ".join(parts), refresh=True)

    def _maybe_print(self) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._print_line()

    def _print_line(self) -> None:
        self._shown = (self.done, self.passes)
        self._print(self.line())

    def _print(self, message: str) -> None:
        try:
            self.stream.write(message + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not stop the run
