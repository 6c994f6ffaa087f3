"""``camx models``, ``camx layers`` and ``camx methods``: what camx can explain, and how."""

from __future__ import annotations

import json
from typing import Any

import click

from cam_cli.cli.common import CONTEXT, reported_errors


@click.command(context_settings=CONTEXT)
@click.option(
    "--probe",
    is_flag=True,
    help="Build each model PATTERN matches (random weights) and inspect it now instead of using the table; "
    "rows print as they are ready.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model.")
@click.option(
    "--source",
    type=click.Choice(["torchvision", "timm"]),
    default="torchvision",
    show_default=True,
    help="Which models: torchvision's (and the demo model), or timm's (camx[timm]; use them as timm:NAME).",
)
@click.argument("pattern", required=False)
def models(probe: bool, as_json: bool, source: str, pattern: str | None) -> None:
    """List the supported models: the methods that apply, the input size and the default layer.

    CAM needs a head of global average pooling then one linear layer; for the
    other models the head that rules it out is shown. Segmentation models
    (fcn_*, deeplabv3_*, lraspp_*) are marked with their task. PATTERN (e.g. 'vit_*')
    keeps the names it matches. timm's models are listed with their input
    size; --probe builds and inspects them (slow: give a PATTERN).

    \b
    Example:
        camx models | grep resnet
        camx models --source timm 'convnext_*'
    """
    from cam_cli.device import freeze_imported_objects
    from cam_cli.probe.catalog import describe_models, describe_timm_models

    freeze_imported_objects()
    with reported_errors():
        if source == "timm":
            rows = describe_timm_models(pattern, live=probe)
        else:
            rows = describe_models(live=probe, pattern=pattern)
        if not as_json:
            click.echo(f"{'model':<20} {'methods':<12} {'size':>4}  default layer")
        for row in rows:  # each as soon as it is known (--probe builds the models one by one)
            click.echo(json.dumps(row) if as_json else _model_line(row))
        if source == "torchvision":
            from cam_cli.models.detection import describe_detection_models

            for row in describe_detection_models(pattern):
                click.echo(json.dumps(row) if as_json else _model_line(row))


def _model_line(row: dict[str, Any]) -> str:
    if row.get("task") == "detection":
        return f"{row['model']:<20} {'detection':<12} {'-':>4}  {row['layer']}  (one map per detection)"
    if row["cam"] is None:
        return f"{row['model']:<20} {'?':<12} {row['input_size']:>4}  (camx layers {row['model']})"
    cam = "cam+gradcam" if row["cam"] else "gradcam"
    why = f"  (no CAM: {row['reason']})" if row.get("reason") else ""
    if row.get("task", "classification") != "classification":
        why = f"  ({row['task']}: no CAM, the head is convolutional)"
    return f"{row['model']:<20} {cam:<12} {row['input_size']:>4}  {row['layer']}{why}"


@click.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--input-size", type=click.IntRange(min=16), default=None, help="Input size [default: the model's].")
@click.option(
    "--weights",
    default="NONE",
    show_default=True,
    help="Weights to build the model with (layers do not depend on them).",
)
def layers(model: str, input_size: int | None, weights: str) -> None:
    """Print MODEL's candidate target layers with their output shapes.

    MODEL is anything --model takes: resnet50, timm:NAME, hf:PATH, a factory or a file.

    \b
    Example:
        camx layers resnet50 --input-size 320
        camx layers timm:vit_small_patch16_224
    """
    from cam_cli.device import freeze_imported_objects
    from cam_cli.models import load_classifier
    from cam_cli.models.detection import is_detection_model
    from cam_cli.probe import list_layers, run_probe

    freeze_imported_objects()
    if is_detection_model(model):
        with reported_errors():
            _detection_layers(model, weights)
        return
    with reported_errors():
        classifier = load_classifier(model, weights, input_size=input_size)
        rows = list_layers(run_probe(classifier))
    click.echo(f"{'layer':<48} {'type':<24} shape")
    for row in rows:
        marker = "  (default)" if row.is_default else ""
        shape = "x".join(str(s) for s in row.shape[1:])
        click.echo(f"{row.label:<48} {row.module_type:<24} {shape}{marker}")


def _detection_layers(model: str, weights: str) -> None:
    """A detection model's layers with 4-d outputs (on a grey 320x480 image), the default marked."""
    from cam_cli.models.detection import default_layer, layer_shapes, load_detector

    detector = load_detector(model, weights)
    default, why = default_layer(detector.module)
    click.echo(f"{'layer':<48} {'type':<24} shape (a 320x480 image, as the model resizes it)")
    for name, kind, shape in layer_shapes(detector.module):
        marker = f"  (default: {why})" if name == default else ""
        click.echo(f"{name:<48} {kind:<24} {'x'.join(str(s) for s in shape[1:])}{marker}")


@click.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per method.")
def methods(as_json: bool) -> None:
    """List every CAM method: family, passes per image, class-specific or not, paper.

    Methods of one run share the forward pass; the gradient methods marked
    "shared" also share one backward pass. `camx explain --method a,b,c` runs
    several at once.

    \b
    Example:
        camx methods --json | jq -r .name
    """
    from cam_cli.methods.registry import METHODS

    if as_json:
        for entry in METHODS.values():
            click.echo(json.dumps(entry.as_dict()))
        return
    click.echo(f"{'method':<20} {'family':<12} {'fwd':>4} {'bwd':>3}  {'class':<8} {'smoothing':<12} paper")
    for entry in METHODS.values():
        backwards = f"{entry.backwards}" + ("*" if entry.shares_backward else "")
        smooth = "/".join(s for s, ok in (("aug", entry.aug_smooth), ("eigen", entry.eigen_smooth)) if ok) or "-"
        specific = "specific" if entry.class_specific else "agnostic"
        forwards = entry.forwards_note or str(entry.forwards)
        click.echo(
            f"{entry.name:<20} {entry.family:<12} {forwards:>4} {backwards:>3}  {specific:<8} {smooth:<12} "
            f"{entry.paper}"
        )
    click.echo("* one backward pass shared by every method so marked; fwd/bwd are per image, the method alone")
    if any(entry.forwards_note for entry in METHODS.values()):
        click.echo("* K = the target layer's channels (2048 for resnet50's layer4): the passes one image costs")
        click.echo("* N = --noise-samples (smoothgradcam++, sscam) or the steps of iscam's integral")
        click.echo("* P = sess's patches, each one forward and one backward pass (122 at 224 pixels, --sess-scales 12)")
        click.echo(
            "* ^ ablationcam: 1 where global average pooling and one linear layer follow the layer (closed form);"
            " else K passes of the layers after it, or K whole passes where the network cannot be cut there"
        )
