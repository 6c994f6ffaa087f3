"""Option bundles: the options ``explain`` and ``evaluate`` share, declared once
(sqlite-utils' ``@output_options`` pattern). Each bundle takes what differs
between the commands (a default, a help text) and keeps the rest (name, type,
callback) in one place."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cam_cli.cli.common import FiniteFloat, parse_device

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _bundle(*options: Decorator) -> Decorator:
    """Apply ``options`` so that they show in ``--help`` in the order given."""

    def apply(function: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            function = option(function)
        return function

    return apply


def model_options(model: str | None, model_help: str, weights: str | None, weights_help: str, classes_help: str,
                  labels_help: str) -> Decorator:  # fmt: skip
    """``--model``, ``--weights``, ``--num-classes``, ``--labels``."""
    return _bundle(
        click.option("--model", default=model, show_default=model is not None, help=model_help),
        click.option("--weights", default=weights, show_default=weights is not None, help=weights_help),
        click.option("--num-classes", type=click.IntRange(min=1), default=None, help=classes_help),
        click.option(
            "--labels", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None, help=labels_help
        ),
    )


def preprocessing_options(size_help: str, mean_help: str, std_help: str, key_help: str) -> Decorator:
    """``--input-size``, ``--mean``, ``--std``, ``--output-key``."""
    return _bundle(
        click.option("--input-size", type=click.IntRange(min=16), default=None, help=size_help),
        click.option("--mean", type=FiniteFloat(), nargs=3, default=None, help=mean_help),
        click.option("--std", type=FiniteFloat(min=0, min_open=True), nargs=3, default=None, help=std_help),
        click.option("--output-key", default=None, help=key_help),
    )


def device_options(batch_size: int, batch_help: str) -> Decorator:
    """``--device``, ``--batch-size``, ``--workers``."""
    return _bundle(
        click.option(
            "--device",
            default="auto",
            show_default=True,
            callback=parse_device,
            help="auto, cpu, cuda, cuda:N or mps (auto: cuda, then mps, then cpu).",
        ),
        click.option(
            "--batch-size", type=click.IntRange(min=1), default=batch_size, show_default=True, help=batch_help
        ),
        click.option(
            "--workers",
            type=click.IntRange(min=0),
            default=None,
            help="Decoding worker processes [default: CPU count - 1, 1 to 8].",
        ),
    )


def precision_option(help: str) -> Decorator:
    """``--precision``."""
    return click.option(
        "--precision",
        type=click.Choice(["fp32", "fp16", "bf16"]),
        default="fp32",
        show_default=True,
        help=help,
    )


def output_options(quiet_help: str, json_help: str) -> Decorator:
    """``-q/--quiet`` and ``--json``."""
    return _bundle(
        click.option("-q", "--quiet", is_flag=True, help=quiet_help),
        click.option("--json", "as_json", is_flag=True, help=json_help),
    )
