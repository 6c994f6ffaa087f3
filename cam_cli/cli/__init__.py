"""The ``camx`` command line: parse, validate, call the library, report.

One module per command (``explain``, ``evaluate``, ``report``, ``listing``: models,
layers and methods, ``merge``); what they share is in :mod:`~cam_cli.cli.common`
(exit statuses, errors to one line) and :mod:`~cam_cli.cli.options` (the option
bundles explain and evaluate both declare). Command modules import only click at
their top, so ``camx --help`` stays fast; the library loads when a command runs.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import click

from cam_cli import __version__
from cam_cli.cli.common import CONTEXT, EXIT_SIGINT
from cam_cli.cli.evaluate import evaluate
from cam_cli.cli.explain import explain
from cam_cli.cli.listing import layers, methods, models
from cam_cli.cli.merge import merge
from cam_cli.cli.report import report


class CamxGroup(click.Group):
    """Click's group, with Ctrl-C at any moment (loading torch, the model) exiting 130, a
    reader that stopped reading (``camx models | head -1``) ending the command quietly
    with 0, and each command's first sentence shown whole in ``camx --help``."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("camx: interrupted", err=True)
            sys.exit(EXIT_SIGINT)
        except BrokenPipeError:
            # Whoever reads stdout has what they wanted: not an error. What is still buffered
            # goes nowhere, so that exiting does not raise the same error again.
            _silence_closed_streams()
            sys.exit(0)


@click.group(cls=CamxGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="camx")
def main() -> None:
    """Explain image classifiers with class activation maps: CAM, Grad-CAM and 14 more methods.

    \b
    Example:
        camx explain ./imgs --method gradcam --device cuda -o ./out
    """


def run() -> None:
    """The console script: ``main``, then an exit that leaves out tearing the
    interpreter down (about 0.3 s with torch loaded, ``bench/startup.py``) when
    nothing is left to finish: every file is closed by then and the streams are
    flushed here; with a worker process or thread still alive, the usual exit."""
    try:
        main()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code if exc.code is not None else 0
    if not isinstance(code, int) or _still_running():
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader is gone: what was left for it goes nowhere
        _silence_closed_streams()
    except (OSError, ValueError):  # let Python's own exit report it
        sys.exit(code)
    os._exit(code)


def _silence_closed_streams() -> None:
    """Point stdout (and stderr, where it is closed too) at the null device."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass


def _still_running() -> bool:
    multiprocessing = sys.modules.get("multiprocessing")
    if multiprocessing is not None and multiprocessing.active_children():
        return True
    return any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread())


for _command in (explain, evaluate, report, methods, models, layers, merge):
    main.add_command(_command)
