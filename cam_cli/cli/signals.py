"""Signals during a run: the first SIGINT/SIGTERM finishes the batch in flight and
stops (the run's exit status is then 130 or 143), a second quits at once."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cam_cli.cli.common import EXIT_SIGINT, EXIT_SIGTERM


def current_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


#: The exit status of the signal that stopped the run (130 for SIGINT, 143 for SIGTERM).
interrupt_code = [EXIT_SIGINT]


def _exit_at_once(signum: int, _: Any) -> None:
    """Quit now: what the journal holds is kept; a re-run finishes the rest."""
    import multiprocessing

    try:
        sys.stderr.write(f"camx: {signal.Signals(signum).name} received again: quitting at once\n")
        sys.stderr.flush()
    except (OSError, ValueError, RuntimeError):
        pass
    # The decoding workers ignore SIGINT/SIGTERM; do not leave them behind.
    for child in multiprocessing.active_children():
        child.kill()
    os._exit(EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM)


def _after_the_run(_: int, __: Any) -> None:
    """A first SIGINT/SIGTERM once every input is done: nothing is left to stop, and
    the exit status stays the run's (as its summary says); a second quits at once."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _exit_at_once)


@contextmanager
def graceful_stop(stop: threading.Event, on_first: Callable[[str], None]) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the batch in flight and stop; second: exit at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _: Any) -> None:
        code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
        if stop.is_set():
            _exit_at_once(signum, None)
        interrupt_code[0] = code
        stop.set()
        on_first(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s in previous:
            # Once stopping, a further signal quits at once, also while reporting and exiting;
            # a first one after a complete run changes nothing (`explain` restores the handlers).
            signal.signal(s, _exit_at_once if stop.is_set() else _after_the_run)
