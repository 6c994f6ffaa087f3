"""``camx explain``: maps and overlays for every input and method."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from cam_cli.cli import options as opt
from cam_cli.cli import signals
from cam_cli.cli.common import (
    CONTEXT,
    EXIT_FAILED_INPUTS,
    FiniteFloat,
    fail,
    parse_methods,
    parse_shard,
    reported_errors,
)
from cam_cli.cli.signals import current_handlers, graceful_stop
from cam_cli.errors import plural


@click.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder (created if missing).",
)
@click.option(
    "--files-from",
    type=click.Path(path_type=Path, allow_dash=True, dir_okay=False),
    help="Read input paths from FILE ('-' for stdin): one per line (trailing spaces ignored, # comments), "
    "or NUL-separated as `find -print0` writes them (names taken exactly).",
)
@click.option(
    "--method",
    "method",
    multiple=True,
    callback=parse_methods,
    metavar="NAME[,NAME...]",
    help="CAM method(s): a comma list, or repeat the option; all from one pass [default: gradcam]. "
    "`camx methods` lists them.",
)
@opt.model_options(
    "resnet50",
    "torchvision model name, efficientnet_lite0, timm:NAME (camx[timm]), hf:PATH or hf:ORG/NAME (a Hugging Face "
    "image classifier or CLIP model, camx[hf]), openclip:ARCH (camx[clip]), an exported program (.pt2, dynamic "
    "batch), or package.module:factory.",
    "DEFAULT",
    "DEFAULT (torchvision's, cached in $TORCH_HOME/hub/checkpoints), NONE (random), a weights enum name, "
    "or a .pth path.",
    "Classes of a fine-tuned head (inferred from --weights PATH when omitted).",
    "Class names, one per line, for weights that carry none.",
)
@opt.device_options(16, "Images per batch.")
@click.option(
    "--layer",
    multiple=True,
    callback=lambda _c, _p, value: ",".join(value) if value else None,
    help="Target layer, e.g. layer4 or avgpool:input [default: chosen from the model's structure]; "
    "several (layer3,layer4 or repeated): their maps are fused.",
)
@click.option(
    "--target",
    default=None,
    help="Class to explain: top1, topK (K maps per image), a class index, or a class name [default: top1; "
    "detection models: every detection over --min-score, or topK, a class name or index]; for an embedding "
    "model, similar:REF or dissimilar:REF (REF an image or a folder of images: their mean embedding).",
)
@click.option(
    "--min-score",
    type=FiniteFloat(0, 1),
    default=0.5,
    show_default=True,
    help="Detection models: explain detections scoring at least this.",
)
@click.option(
    "--max-detections",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Detection models: at most this many detections (maps) per image.",
)
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    metavar="TEXT",
    help="A CLIP model's class, as the sentence its text tower embeds (repeat: one class each).",
)
@click.option(
    "--prompt-template",
    default=None,
    metavar="TEXT",
    help="Turns each --labels name into a CLIP prompt, {} standing for the name [default: 'a photo of a {}.'].",
)
@click.option(
    "--target-embedding",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="The reference embedding (.npy, one vector) of --target similar/dissimilar.",
)
@click.option("--alpha", type=FiniteFloat(0, 1), default=0.4, show_default=True, help="Heatmap opacity of the overlay.")
@click.option(
    "--format", "fmt", type=click.Choice(["jpg", "png"]), default="jpg", show_default=True, help="Overlay image format."
)
@opt.preprocessing_options(
    "Model input size in pixels [default: from the weights' transforms, else 224].",
    "Normalisation mean (3 floats) for models that carry none.",
    "Normalisation std (3 positive floats) for models that carry none.",
    "Which output holds the logits, for models returning a dict or tuple.",
)
@opt.precision_option("Autocast precision for the model (maps are always float32).")
@click.option("--overwrite", is_flag=True, help="Redo inputs whose outputs are already complete.")
@click.option("--shard", callback=parse_shard, default=None, help="Process slice K of N of the sorted inputs (K/N).")
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=None,
    help="Largest image (width x height) to decode [default: 178956970, Pillow's limit].",
)
@click.option("--boxes", is_flag=True, help="Add the CAM paper's localisation box to each manifest line.")
@click.option(
    "--box-threshold",
    type=FiniteFloat(0, 1),
    default=0.2,
    show_default=True,
    help="Box threshold, as a fraction of the map's maximum.",
)
@click.option("--draw-boxes", is_flag=True, help="Draw the localisation box on the overlay.")
@opt.method_options()
@click.option("--report", "make_report", is_flag=True, help="Build OUT/report/index.html (`camx report`) at the end.")
@opt.output_options(
    "No progress or summary line (errors still go to stderr). Progress is a bar on a terminal, else a plain "
    "line every $CAMX_PROGRESS_EVERY seconds (30).",
    "Print a JSON summary to stdout at the end.",
)
def explain(inputs: tuple[Path, ...], out_dir: Path, files_from: Path | None, **options: Any) -> None:
    """Write a CAM overlay and raw map for every image in INPUTS (folders or files).

    Folders are searched recursively. For an input with key KEY (its path
    relative to the folder given, or its file name) the outputs are
    OUT/KEY.METHOD.jpg and OUT/KEY.METHOD.npy for each method, and one line
    per input and method in OUT/manifest.jsonl. Re-running the same command
    resumes; adding a method computes only the new one. `camx methods` lists
    the methods.

    \b
    Examples:
        camx explain ./imgs -o ./out
        camx explain ./imgs --method gradcam,gradcam++,layercam,eigencam -o ./out
        camx explain ./imgs --method cam --model resnet18 --device cuda -o ./out
        camx explain ./imgs --model openclip:ViT-B-32 --labels classes.txt -o ./out
        camx explain ./imgs --model timm:resnet50 --num-classes 0 --target similar:query.jpg -o ./out
        find data -name '*.png' | camx explain --files-from - -o ./out --json
    """
    handlers = current_handlers()
    try:
        _explain(inputs, out_dir, files_from, options)
    finally:
        for signum, handler in handlers.items():  # for callers in this process (tests, scripts)
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(signum, handler)


def _explain(inputs: tuple[Path, ...], out_dir: Path, files_from: Path | None, options: dict[str, Any]) -> None:
    from cam_cli import images
    from cam_cli.jobs.explain import ExplainConfig, Explainer
    from cam_cli.jobs.explain.distributed import distributed_context
    from cam_cli.models.detection import is_detection_model

    if not inputs and files_from is None:
        raise click.UsageError("give at least one INPUT folder or file, or --files-from")
    quiet = options.pop("quiet")
    as_json = options.pop("as_json")
    make_report = options.pop("make_report")
    shard = options.pop("shard")
    max_pixels = options.pop("max_pixels")
    detection = is_detection_model(options["model"])
    if options["target"] is None:
        options["target"] = "all" if detection else "top1"
    with reported_errors(as_json):
        listed = _read_file_list(files_from, as_json) if files_from is not None else []
        with distributed_context(shard, options["device"]) as dist:
            config = ExplainConfig(
                inputs=list(inputs),
                out_dir=out_dir,
                listed=listed,
                shard=dist.shard,
                max_pixels=max_pixels or images.DEFAULT_MAX_PIXELS,
                **{**options, "device": dist.device},
            )
            if detection:
                from cam_cli.jobs.detect import DetectionRun

                explainer: Any = DetectionRun(config)
            else:
                explainer = Explainer(config)
            for note in explainer.notes if dist.rank in (None, 0) else []:
                click.echo(f"camx: note: {note}", err=True)
            # under torchrun only rank 0 draws a progress bar; every rank names its failures
            bar_off = quiet or dist.rank not in (None, 0)
            summary = _run_with_progress(explainer, bar_off)
            interrupt_code = dist.finish(out_dir, summary, signals.interrupt_code[0])
    for path, reason in summary.failures if bar_off else []:
        click.echo(f"camx: failed: {path}: {reason}", err=True)
    if dist.rank not in (None, 0):
        return  # under torchrun, rank 0 reports the whole run and gives its exit status
    _tell(summary, out_dir, quiet)
    result = summary.as_dict()
    if make_report and not summary.interrupted:
        from cam_cli.report import build_report

        with reported_errors(as_json):
            page = build_report(out_dir, quiet=True)
        result["report"] = str(page)
        if not quiet:
            click.echo(f"camx: report: {page}", err=True)
    if as_json:
        click.echo(json.dumps(result))
    if summary.interrupted:
        sys.exit(interrupt_code)
    if summary.failed:
        sys.exit(EXIT_FAILED_INPUTS)


def _read_file_list(files_from: Path, as_json: bool) -> list[Path]:
    """The input paths listed in ``--files-from`` (``-``: stdin)."""
    from cam_cli import images

    try:
        if str(files_from) == "-":
            return images.read_file_list(sys.stdin.read())
        return images.read_file_list(Path(files_from).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read --files-from {files_from}: {exc}", 1, as_json)


def _tell(summary: Any, out_dir: Path, quiet: bool) -> None:
    """The run's status line, then warnings about flat maps and an interrupted run, on stderr."""
    if not quiet:
        click.echo(
            f"camx: {plural(summary.total, 'image')}: {summary.done} done, {summary.failed} failed, "
            f"{summary.skipped} skipped (already complete) in {summary.seconds:.1f} s "
            f"({summary.images_per_second:.1f} img/s); outputs in {out_dir}, manifest {summary.manifest}",
            err=True,
        )
    if summary.flat:
        click.echo(
            f"camx: warning: {plural(summary.flat, 'map')} {'is' if summary.flat == 1 else 'are'} flat "
            "(constant before normalisation, so all zero): "
            'the model does not depend on the layer there, or its weights are untrained; see "flat" in the manifest',
            err=True,
        )
    if summary.interrupted:
        left = summary.total - summary.done - summary.skipped - summary.failed
        click.echo(
            f"camx: interrupted with {left} of {plural(summary.total, 'image')} left; run the same command to resume",
            err=True,
        )


def _run_with_progress(explainer: Any, quiet: bool) -> Any:
    """The run, with its progress on stderr (a bar on a terminal, else a plain line now and
    then) and each failure on a line of its own; nothing is shown before the run starts writing."""
    from cam_cli.cli.progress import Progress

    todo, _skipped = explainer.pending()
    stop = threading.Event()
    counts_passes = explainer.counts_passes
    # none where every such method has its closed form (Ablation-CAM after GAP + linear)
    passes_total = (explainer.expected_passes(todo) or None) if counts_passes else None
    several = len(explainer.method_names) > 1
    with Progress(f"camx {','.join(explainer.method_names)}", len(todo), "img", quiet, passes_total) as shown:

        def progress(records: list[dict[str, Any]]) -> None:
            shown.update(len({record["key"] for record in records}))
            if not quiet:
                for record in records:
                    if record["status"] != "ok":
                        where = f"{record['input']} ({record['method']})" if several else record["input"]
                        shown.write(f"camx: failed: {where}: {record['error']}")

        def on_first(name: str) -> None:
            if passes_total is None:
                what = "finishing the batch in flight"
            elif explainer.config.aug_smooth:  # its six passes repeat the whole batch: none of it is finished
                what = "stopping after the current pass; the batch in progress is dropped and redone on resume"
            else:
                what = (
                    "stopping after the current pass; the images of the batch whose maps are finished are kept, "
                    "the others are redone on resume"
                )
            shown.write(f"camx: {name} received: {what} (again to quit at once)")

        on_passes = shown.add_passes if counts_passes and not quiet else None
        with graceful_stop(stop, on_first):
            return explainer.run(progress, stop, on_passes, on_start=shown.start)
