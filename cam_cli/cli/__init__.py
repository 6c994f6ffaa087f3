"""The ``camx`` command line: parse, validate, call the library, report.

Exit statuses: 0 all done; 1 fatal error (nothing or nothing more written);
2 bad usage; 3 the run finished but some inputs failed; 130/143 interrupted
by SIGINT/SIGTERM (what was finished is kept and recorded).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from cam_cli import __version__
from cam_cli.errors import CamxError

EXIT_FAILED_INPUTS = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


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


def _shard(_: click.Context, __: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        k, n = (int(part) for part in value.split("/"))
    except ValueError:
        raise click.BadParameter("expected K/N, e.g. 2/8") from None
    if not 1 <= k <= n:
        raise click.BadParameter("K must be between 1 and N")
    return (k, n)


def _methods(_: click.Context, __: click.Parameter, value: tuple[str, ...]) -> list[str]:
    from cam_cli.methods.registry import parse_methods

    try:
        return parse_methods(value or ("gradcam",))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _device(_: click.Context, __: click.Parameter, value: str) -> str:
    head, _colon, index = value.partition(":")
    if head not in ("auto", "cpu", "cuda", "mps") or (index and (head != "cuda" or not index.isdigit())):
        raise click.BadParameter("use auto, cpu, cuda, cuda:N or mps")
    return value


class CamxGroup(click.Group):
    """Click's group, with Ctrl-C at any moment (loading torch, the model) exiting 130,
    and each command's first sentence shown whole in ``camx --help``."""

    #: commands defined in modules of their own, imported when first asked for (they import
    #: this module for its shared pieces, so it must not import them at its top)
    LAZY = {"evaluate": "cam_cli.cli.evaluate:evaluate", "report": "cam_cli.cli.report:report"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.LAZY and cmd_name not in self.commands:
            import importlib

            module, _, attribute = self.LAZY[cmd_name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute))
        return super().get_command(ctx, cmd_name)

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


@click.group(cls=CamxGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    except (OSError, ValueError):  # a closed pipe: let Python's own exit report it
        sys.exit(code)
    os._exit(code)


def _still_running() -> bool:
    multiprocessing = sys.modules.get("multiprocessing")
    if multiprocessing is not None and multiprocessing.active_children():
        return True
    return any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread())


@main.command()
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
    help="Read input paths from FILE, one per line ('-' for stdin).",
)
@click.option(
    "--method",
    "method",
    multiple=True,
    callback=_methods,
    metavar="NAME[,NAME...]",
    help="CAM method(s): a comma list, or repeat the option; all from one pass [default: gradcam]. "
    "`camx methods` lists them.",
)
@click.option(
    "--model",
    default="resnet50",
    show_default=True,
    help="torchvision model name, efficientnet_lite0, an exported program (.pt2, dynamic batch), "
    "or package.module:factory.",
)
@click.option(
    "--weights",
    default="DEFAULT",
    show_default=True,
    help="DEFAULT (torchvision's, cached in $TORCH_HOME/hub/checkpoints), NONE (random), a weights enum name, "
    "or a .pth path.",
)
@click.option(
    "--num-classes",
    type=click.IntRange(min=1),
    help="Classes of a fine-tuned head (inferred from --weights PATH when omitted).",
)
@click.option(
    "--labels",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Class names, one per line, for weights that carry none.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=_device,
    help="auto, cpu, cuda, cuda:N or mps (auto: cuda, then mps, then cpu).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per batch.")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Decoding worker processes [default: CPU count - 1, 1 to 8].",
)
@click.option(
    "--layer",
    default=None,
    help="Target layer, e.g. layer4 or avgpool:input [default: chosen from the model's structure].",
)
@click.option(
    "--target",
    default="top1",
    show_default=True,
    help="Class to explain: top1, topK (K maps per image), a class index, or a class name.",
)
@click.option("--alpha", type=FiniteFloat(0, 1), default=0.4, show_default=True, help="Heatmap opacity of the overlay.")
@click.option(
    "--format", "fmt", type=click.Choice(["jpg", "png"]), default="jpg", show_default=True, help="Overlay image format."
)
@click.option(
    "--input-size",
    type=click.IntRange(min=16),
    default=None,
    help="Model input size in pixels [default: from the weights' transforms, else 224].",
)
@click.option(
    "--mean",
    type=FiniteFloat(),
    nargs=3,
    default=None,
    help="Normalisation mean (3 floats) for models that carry none.",
)
@click.option(
    "--std",
    type=FiniteFloat(min=0, min_open=True),
    nargs=3,
    default=None,
    help="Normalisation std (3 positive floats) for models that carry none.",
)
@click.option("--output-key", default=None, help="Which output holds the logits, for models returning a dict or tuple.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default="fp32",
    show_default=True,
    help="Autocast precision for the model (maps are always float32).",
)
@click.option("--overwrite", is_flag=True, help="Redo inputs whose outputs are already complete.")
@click.option("--shard", callback=_shard, default=None, help="Process slice K of N of the sorted inputs (K/N).")
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
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random method's channel weights.")
@click.option(
    "--finer-gamma",
    type=FiniteFloat(min=0),
    default=1.0,
    show_default=True,
    help="finercam: weight of the nearest other class's score.",
)
@click.option("--aug-smooth", is_flag=True, help="Average each map over flips and scalings of the input (6 passes).")
@click.option("--eigen-smooth", is_flag=True, help="Use the first principal component of the weighted activations.")
@click.option("--report", "make_report", is_flag=True, help="Build OUT/report/index.html (`camx report`) at the end.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary line (errors still go to stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary to stdout at the end.")
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
        find data -name '*.png' | camx explain --files-from - -o ./out --json
    """
    handlers = _current_handlers()
    try:
        _explain(inputs, out_dir, files_from, options)
    finally:
        for signum, handler in handlers.items():  # for callers in this process (tests, scripts)
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(signum, handler)


def _current_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def _explain(inputs: tuple[Path, ...], out_dir: Path, files_from: Path | None, options: dict[str, Any]) -> None:
    from cam_cli import images
    from cam_cli.jobs.explain import ExplainConfig, Explainer
    from cam_cli.jobs.explain.distributed import distributed_context

    if not inputs and files_from is None:
        raise click.UsageError("give at least one INPUT folder or file, or --files-from")
    quiet = options.pop("quiet")
    as_json = options.pop("as_json")
    make_report = options.pop("make_report")
    shard = options.pop("shard")
    max_pixels = options.pop("max_pixels")
    with reported_errors(as_json):
        listed: list[Path] = []
        if files_from is not None:
            try:
                if str(files_from) == "-":
                    listed = images.read_file_list(sys.stdin.read())
                else:
                    listed = images.read_file_list(Path(files_from).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                fail(f"cannot read --files-from {files_from}: {exc}", 1, as_json)
        with distributed_context(shard, options["device"]) as dist:
            config = ExplainConfig(
                inputs=list(inputs),
                out_dir=out_dir,
                listed=listed,
                shard=dist.shard,
                max_pixels=max_pixels or images.DEFAULT_MAX_PIXELS,
                **{**options, "device": dist.device},
            )
            explainer = Explainer(config)
            # under torchrun only rank 0 draws a progress bar; every rank names its failures
            bar_off = quiet or dist.rank not in (None, 0)
            summary = _run_with_progress(explainer, bar_off)
            interrupt_code = dist.finish(out_dir, summary, _interrupt_code[0])
    for path, reason in summary.failures if bar_off else []:
        click.echo(f"camx: failed: {path}: {reason}", err=True)
    if dist.rank not in (None, 0):
        return  # under torchrun, rank 0 reports the whole run and gives its exit status
    if not quiet:
        click.echo(
            f"camx: {summary.total} images: {summary.done} done, {summary.failed} failed, "
            f"{summary.skipped} skipped (already complete) in {summary.seconds:.1f} s "
            f"({summary.images_per_second:.1f} img/s); outputs in {out_dir}, manifest {summary.manifest}",
            err=True,
        )
    if summary.flat:
        click.echo(
            f"camx: warning: {summary.flat} map(s) are flat (constant before normalisation, so all zero): "
            'the model does not depend on the layer there, or its weights are untrained; see "flat" in the manifest',
            err=True,
        )
    if summary.interrupted:
        left = summary.total - summary.done - summary.skipped - summary.failed
        click.echo(
            f"camx: interrupted with {left} of {summary.total} images left; run the same command to resume", err=True
        )
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


#: The exit status of the signal that stopped the run (130 for SIGINT, 143 for SIGTERM).
_interrupt_code = [EXIT_SIGINT]


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
def _graceful_stop(stop: threading.Event, on_first: Callable[[str], None]) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the batch in flight and stop; second: exit at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _: Any) -> None:
        code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
        if stop.is_set():
            _exit_at_once(signum, None)
        _interrupt_code[0] = code
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


def _run_with_progress(explainer: Any, quiet: bool) -> Any:
    from tqdm import tqdm

    todo, skipped = explainer.pending()
    stop = threading.Event()
    with tqdm(
        total=len(todo),
        unit="img",
        disable=quiet,
        file=sys.stderr,
        dynamic_ncols=True,
        desc=f"camx {','.join(explainer.method_names)}",
    ) as bar:

        def progress(records: list[dict[str, Any]]) -> None:
            bar.update(len({record["key"] for record in records}))
            if not quiet:
                for record in records:
                    if record["status"] != "ok":
                        where = f"{record['input']} ({record['method']})" if len(explainer.method_names) > 1 else \
                            record["input"]  # fmt: skip
                        bar.write(f"camx: failed: {where}: {record['error']}", file=sys.stderr)

        def on_first(name: str) -> None:
            bar.write(f"camx: {name} received: finishing the batch in flight (again to quit at once)", file=sys.stderr)

        batches = getattr(getattr(explainer, "session", None), "explainer", None)
        if batches is not None and any(m.after_pass for m in batches.methods) and not quiet:
            # Score-CAM and Ablation-CAM run many forward passes per image: count those too
            passes = [0]

            def on_passes(count: int) -> None:
                passes[0] += count
                bar.set_postfix_str(f"{passes[0]} forward passes", refresh=True)

            batches.on_passes = on_passes

        with _graceful_stop(stop, on_first):
            return explainer.run(progress, stop)


@main.command()
@click.option(
    "--probe", is_flag=True, help="Build every model (random weights) and inspect it now instead of using the table."
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
    other models the head that rules it out is shown. PATTERN (e.g. 'vit_*')
    keeps the names it matches. timm's models are listed with their input
    size; --probe builds and inspects them (slow: give a PATTERN).

    \b
    Example:
        camx models | grep resnet
        camx models --source timm 'convnext_*'
    """
    import fnmatch

    from cam_cli.device import freeze_imported_objects
    from cam_cli.probe.catalog import describe_models, describe_timm_models

    freeze_imported_objects()
    with reported_errors():
        if source == "timm":
            rows = describe_timm_models(pattern, live=probe)
        else:
            rows = [r for r in describe_models(live=probe) if pattern is None or fnmatch.fnmatch(r["model"], pattern)]
    if not as_json:
        click.echo(f"{'model':<20} {'methods':<12} {'size':>4}  default layer")
    for row in rows:
        if as_json:
            click.echo(json.dumps(row))
        elif row["cam"] is None:
            click.echo(f"{row['model']:<20} {'?':<12} {row['input_size']:>4}  (camx layers {row['model']})")
        else:
            cam = "cam+gradcam" if row["cam"] else "gradcam"
            why = f"  (no CAM: {row['reason']})" if row.get("reason") else ""
            click.echo(f"{row['model']:<20} {cam:<12} {row['input_size']:>4}  {row['layer']}{why}")


@main.command()
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
    from cam_cli.probe import list_layers, run_probe

    freeze_imported_objects()
    with reported_errors():
        classifier = load_classifier(model, weights, input_size=input_size)
        rows = list_layers(run_probe(classifier))
    click.echo(f"{'layer':<48} {'type':<24} shape")
    for row in rows:
        marker = "  (default)" if row.is_default else ""
        shape = "x".join(str(s) for s in row.shape[1:])
        click.echo(f"{row.label:<48} {row.module_type:<24} {shape}{marker}")


@main.command()
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
        click.echo(
            "* ^ ablationcam: 1 where global average pooling and one linear layer follow the layer (closed form);"
            " else K passes of the layers after it, or K whole passes where the network cannot be cut there"
        )


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
def merge(out_dir: Path) -> None:
    """Join the shards' manifest parts in OUT_DIR into OUT_DIR/manifest.jsonl.

    \b
    Example:
        camx merge ./out
    """
    from cam_cli import rundir

    with reported_errors():
        parts = rundir.shard_parts(out_dir)
        count = rundir.merge_manifests(out_dir, parts)
    click.echo(f"camx: merged {len(parts)} parts into {out_dir / 'manifest.jsonl'} ({count} lines)", err=True)
    gaps = rundir.part_warnings(parts)
    for gap in gaps:
        click.echo(f"camx: warning: {gap}", err=True)
    if gaps:
        sys.exit(EXIT_FAILED_INPUTS)
