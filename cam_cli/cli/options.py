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
from cam_cli.methods.registry import SESS_BASES

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
        click.option("--num-classes", type=click.IntRange(min=0), default=None, help=classes_help),
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


def method_options() -> Decorator:
    """The options that shape some methods' maps (``explain`` only): ``--seed``, each
    method's own parameters, ``--aug-smooth`` and ``--eigen-smooth``."""
    return _bundle(
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="Seed of the random method's weights and of the noise of smoothgradcam++ and sscam.",
        ),
        click.option(
            "--finer-gamma",
            type=FiniteFloat(min=0),
            default=1.0,
            show_default=True,
            help="finercam: weight of the nearest other class's score.",
        ),
        click.option(
            "--kpca-kernel",
            type=click.Choice(["linear", "poly", "rbf", "sigmoid", "cosine"]),
            default="sigmoid",
            show_default=True,
            help="kpcacam: the kernel of the kernel PCA.",
        ),
        click.option(
            "--kpca-gamma",
            type=FiniteFloat(min=0),
            default=None,
            help="kpcacam: the kernel's coefficient [default: 1 / the layer's channels].",
        ),
        click.option(
            "--concepts",
            type=click.IntRange(min=1),
            default=5,
            show_default=True,
            help="dff: the concepts (NMF components) each image is factorised into, one map each.",
        ),
        click.option(
            "--sess-base",
            type=click.Choice(list(SESS_BASES)),
            default="gradcam",
            show_default=True,
            help="sess: the method explaining each patch.",
        ),
        click.option(
            "--sess-scales",
            type=click.IntRange(min=1),
            default=12,
            show_default=True,
            help="sess: the scales the input is resized to (the first is the input; 122 patches at 224 pixels "
            "with 12).",
        ),
        click.option(
            "--noise-samples",
            type=click.IntRange(min=1),
            default=None,
            help="smoothgradcam++, sscam: noisy copies per image; iscam: integration steps "
            "[default: torchcam's, 4, 35 and 10].",
        ),
        click.option(
            "--noise-std",
            type=FiniteFloat(min=0),
            default=None,
            help="smoothgradcam++: std of the noise on the normalised input; sscam: on the masks "
            "[default: torchcam's, 0.3 and 2.0]. Seeded by --seed.",
        ),
        click.option(
            "--aug-smooth", is_flag=True, help="Average each map over flips and scalings of the input (6 passes)."
        ),
        click.option(
            "--eigen-smooth", is_flag=True, help="Use the first principal component of the weighted activations."
        ),
    )
