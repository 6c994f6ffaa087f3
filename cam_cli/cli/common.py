"""What every command shares: exit statuses, the one place that turns a ``CamxError``
into one line on stderr and its exit status, and parameter types and callbacks.

Exit statuses: 0 all done; 1 fatal error (nothing or nothing more written);
2 bad usage; 3 the run finished but some inputs failed; 130/143 interrupted
by SIGINT/SIGTERM (what was finished is kept and recorded).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from cam_cli.errors import CamxError

EXIT_FAILED_INPUTS = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

#: what every command's context shares
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def fail(message: str, code: int = 1, as_json: bool = False) -> NoReturn:
    click.echo(f"camx: error: {message}", err=True)
    if as_json:  # scripts reading --json always get one object
        click.echo(json.dumps({"error": message, "exit_status": code}))
    sys.exit(code)


@contextmanager
def reported_errors(as_json: bool = False) -> Iterator[None]:
    """Turn library errors into one line on stderr and their exit status."""
    try:
        yield
    except CamxError as exc:
        fail(str(exc), exc.exit_code, as_json)
    except KeyboardInterrupt:
        click.echo("camx: interrupted", err=True)
        sys.exit(EXIT_SIGINT)
    except BrokenPipeError:  # stdout's reader is gone: the command group ends quietly
        raise
    except Exception as exc:
        if os.environ.get("CAMX_DEBUG"):
            raise
        message = " ".join(str(exc).split())[:300]
        fail(f"unexpected {type(exc).__name__}: {message} (set CAMX_DEBUG=1 for a traceback)", 1, as_json)


class FiniteFloat(click.FloatRange):
    """A float in an optional range that is also finite: ``nan`` passes every
    comparison, so ``FloatRange`` alone lets it through."""

    name = "number"

    def _describe_range(self) -> str:
        if self.min is None and self.max is None:
            return ""  # click would print "x<=None"
        return super()._describe_range()

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "NUMBER"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        result = super().convert(value, param, ctx)
        if not math.isfinite(result):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return result


def parse_shard(_: click.Context, __: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        k, n = (int(part) for part in value.split("/"))
    except ValueError:
        raise click.BadParameter("expected K/N, e.g. 2/8") from None
    if not 1 <= k <= n:
        raise click.BadParameter("K must be between 1 and N")
    return (k, n)


def parse_methods(_: click.Context, __: click.Parameter, value: tuple[str, ...]) -> list[str]:
    from cam_cli.methods.registry import parse_methods as parse

    try:
        return parse(value or ("gradcam",))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def parse_device(_: click.Context, __: click.Parameter, value: str) -> str:
    head, _colon, index = value.partition(":")
    if head not in ("auto", "cpu", "cuda", "mps") or (index and (head != "cuda" or not index.isdigit())):
        raise click.BadParameter("use auto, cpu, cuda, cuda:N or mps")
    return value
