"""``camx evaluate OUT``: faithfulness metrics over a finished ``camx explain`` run.

Registered in the main group with ``main.add_command(evaluate)``. Exit statuses
as ``explain``'s: 0 all done, 1 fatal error (nothing written), 2 bad usage, 3
some lines failed (a missing or unreadable map), 130 interrupted.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from cam_cli.cli import options as opt
from cam_cli.cli.common import CONTEXT, EXIT_FAILED_INPUTS, FiniteFloat, reported_errors
from cam_cli.errors import plural
from cam_cli.metrics import DEFAULT_METRICS, METRICS, REGION_METRICS, parse_metrics, statistic
from cam_cli.metrics.options import BASELINES, MPRT_ORDERS


def _metrics(_: click.Context, __: click.Parameter, value: str) -> list[str]:
    try:
        return parse_metrics(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("evaluate", context_settings=CONTEXT)
@click.argument("out_dir", metavar="OUT", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--metrics",
    callback=_metrics,
    default=",".join(DEFAULT_METRICS),
    show_default=True,
    help=f"Comma-separated metrics: {', '.join(METRICS)}, or all (pointing and iou need --boxes-from; "
    f"{', '.join(REGION_METRICS)} need --masks-from or --boxes-from; "
    f"all leaves out {', '.join(n for n, s in METRICS.items() if not s.in_all)}: name them).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Intervals of the deletion and insertion curves.",
)
@click.option(
    "--baseline",
    type=click.Choice(list(BASELINES)),
    default="zero",
    show_default=True,
    help="What deletion puts in and insertion starts from: zeros of the normalised input, or the image blurred.",
)
@click.option(
    "--road-noise",
    type=FiniteFloat(min=0),
    default=0.01,
    show_default=True,
    help="Standard deviation of the noise ROAD's imputer adds (normalised input units).",
)
@click.option(
    "--boxes-from",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Ground-truth boxes (CSV key,x0,y0,x1,y1[,class] or COCO-style JSON); adds pointing and iou.",
)
@click.option(
    "--masks-from",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="Ground-truth masks: a folder of PNGs, one per input (nonzero = object), or COCO JSON with polygons; "
    "adds the region metrics unless --metrics names some.",
)
@click.option(
    "--topk",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Pixels of the map's top that topk-intersection compares with the region.",
)
@click.option(
    "--complexity-eps",
    type=FiniteFloat(min=0),
    default=1e-5,
    show_default=True,
    help="effective-complexity counts the pixels above this (the map scaled to a maximum of 1).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of ROAD's noise, faithfulness-correlation's subsets, MPRT's random weights, random-logit's class "
    "and the bootstrap.",
)
@click.option(
    "--flip-step",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Pixels pixel-flipping flips per step (1, the reference's budget, needs --budget-ok).",
)
@click.option(
    "--patch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Region-perturbation's patch side."
)
@click.option(
    "--regions",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Patches region-perturbation removes, one per step (MoRF and LeRF each).",
)
@click.option(
    "--corr-runs",
    type=click.IntRange(min=2),
    default=100,
    show_default=True,
    help="Random subsets faithfulness-correlation correlates over.",
)
@click.option(
    "--corr-subset",
    type=click.IntRange(min=1),
    default=224,
    show_default=True,
    help="Features (one channel of one pixel each) in each of faithfulness-correlation's subsets.",
)
@click.option(
    "--mprt-order",
    type=click.Choice(list(MPRT_ORDERS)),
    default="cascading",
    show_default=True,
    help="MPRT: randomise the blocks from the top down, keeping each (cascading), or one at a time.",
)
@click.option(
    "--budget-ok",
    is_flag=True,
    help="Run metrics that take over ten times deletion/insertion's forward passes (refused otherwise).",
)
@opt.model_options(
    None,
    "Rebuild this model instead of the one the manifest records.",
    None,
    "Weights for the rebuilt model [default: the manifest's].",
    "Classes of a fine-tuned head.",
    "Class names, one per line (matched against the classes of --boxes-from).",
)
@opt.preprocessing_options(
    "Model input size [default: the manifest's].",
    "Normalisation mean [default: the manifest's].",
    "Normalisation std [default: the manifest's].",
    "Which output holds the logits [default: the manifest's].",
)
@click.option(
    "--with-other-model",
    is_flag=True,
    help="Score the maps with the --model/--weights given although they did not make them; "
    "the metrics go to OUT/metrics.other-MODEL.jsonl, apart from the run's own.",
)
@opt.device_options(32, "Perturbed images per forward pass (of several images, steps and metrics).")
@opt.precision_option("Autocast precision for the model.")
@opt.output_options(
    "No progress bar, warnings or status line (the table still prints).",
    "Print one JSON object (the run and its summary) instead of the table.",
)
def evaluate(out_dir: Path, **options: Any) -> None:
    """Measure how faithful the maps of a camx explain run in OUT are.

    Every ok line of OUT's manifest (its rank-1 map) is scored with the model
    the manifest records, rebuilt: deletion and insertion AUC (RISE), Average
    Drop and Increase in Confidence (Grad-CAM++), optionally ROAD, the
    complexity of the map and, with --boxes-from (a detection run: each
    detection's own box), the pointing game and box IoU; with --masks-from
    (or boxes), how much of the map lies on the object. One line per (input, method)
    goes to OUT/metrics.jsonl; the summary per method (means with 95% bootstrap
    intervals, ranks, the gap to the random control) to OUT/metrics-summary.json
    and stdout. Re-running resumes and skips what is done.

    \b
    Examples:
        camx explain ./imgs --method gradcam,cam,random -o ./out
        camx evaluate ./out
        camx evaluate ./out --metrics all --boxes-from boxes.csv --device cuda --json
        camx evaluate ./out --metrics sparseness,complexity --masks-from ./masks
    """
    from cam_cli.jobs.evaluate import EvaluateConfig, Evaluator

    quiet = options.pop("quiet")
    as_json = options.pop("as_json")
    names = list(options.pop("metrics"))
    if options["boxes_from"] is not None:
        names += [n for n in ("pointing", "iou") if n not in names]
    elif any(METRICS[n].family == "localisation" for n in names) and not _detection_run(out_dir):
        raise click.UsageError("the metrics pointing and iou need ground-truth boxes: pass --boxes-from FILE")
    if options["masks_from"] is not None and not any(METRICS[n].family == "region" for n in names):
        names += list(REGION_METRICS)
    regional = [n for n in names if METRICS[n].family == "region"]
    if regional and options["masks_from"] is None and options["boxes_from"] is None and not _detection_run(out_dir):
        raise click.UsageError(
            f"the metrics {', '.join(regional)} need ground truth: pass --masks-from DIR|FILE.json or --boxes-from FILE"
        )
    with reported_errors(as_json):
        config = EvaluateConfig(out_dir=out_dir, metrics=names, **options)
        evaluator = Evaluator(config)
        result = _run_with_progress(evaluator, quiet)
    for warning in result.warnings if not quiet else []:
        click.echo(f"camx: warning: {warning}", err=True)
    if quiet:
        for where, reason in result.failures:
            click.echo(f"camx: failed: {where}: {reason}", err=True)
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    else:
        click.echo(format_summary(result.summary))
    if not quiet:
        click.echo(
            f"camx: {plural(result.total, 'line')}: {result.done} evaluated, {result.failed} failed, "
            f"{result.skipped} skipped (already evaluated) in {result.seconds:.1f} s "
            f"({plural(result.passes, 'forward pass', 'forward passes')}, "
            f"{result.passes_per_second:.1f}/s); {result.metrics_file}, {result.summary_file}",
            err=True,
        )
    if result.failed:
        sys.exit(EXIT_FAILED_INPUTS)


def _detection_run(out_dir: Path) -> bool:
    """Whether every line of OUT explains a detection (its own box stands in for ground truth)."""
    from cam_cli import rundir
    from cam_cli.errors import CamxError

    try:
        records = rundir.read_run(out_dir).records
    except CamxError:
        return False
    return bool(records) and all(r.get("task") == "detection" for r in records.values())


def _run_with_progress(evaluator: Any, quiet: bool) -> Any:
    """The run, with its progress on stderr (a bar on a terminal, else a plain line now and
    then) from its first evaluated lines on, and each failure on a line of its own."""
    from cam_cli.cli.progress import Progress

    todo, _ = evaluator.pending()
    started = time.perf_counter()
    passes = [0]
    with Progress("camx evaluate", len(todo), "pair", quiet) as shown:

        def progress(lines: list[dict[str, Any]], done_passes: int) -> None:
            passes[0] += done_passes
            elapsed = time.perf_counter() - started
            shown.update(len(lines), f"{passes[0] / elapsed:.1f} passes/s" if elapsed > 0 else None)
            if not quiet:
                for line in lines:
                    if line["status"] != "ok":
                        shown.write(f"camx: failed: {line['key']} ({line['method']}): {line['error']}")

        return evaluator.run(progress)


def _cell(stat: dict[str, Any] | None, digits: int, n: int) -> str:
    """``mean [low, high]``, with its count where fewer lines than the row's have the value."""
    if not stat or stat.get("mean") is None:
        return "-"
    count = f" (n={stat['n']})" if stat["n"] != n else ""
    return f"{stat['mean']:.{digits}f} [{stat['low']:.{digits}f}, {stat['high']:.{digits}f}]{count}"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as Markdown tables: methods by rank, then each method's gap to ``random``."""
    methods = summary.get("methods", {})
    if not methods:
        return "camx evaluate: no evaluated lines"
    stats = list(next(iter(methods.values()))["metrics"])
    digits = {s: statistic(s).digits for s in stats}  # titles and digits: the metric registry's
    arrows = {"lower": "↓", "higher": "↑"}
    first = next(iter(methods.values()))["metrics"]
    header = [f"{statistic(s).title} {arrows[first[s]['better']]}" for s in stats]
    options = summary.get("options", {})
    lines = [
        f"camx evaluate: {', '.join(summary.get('models', []))}, {options.get('steps')} steps, "
        f"{options.get('baseline')} baseline; mean [95% bootstrap interval]; rank (mean rank over the columns), "
        "shared by methods whose intervals overlap on every column",
        "",
        "| rank | method | n | " + " | ".join(header) + " |",
        "|---|---|---|" + "---|" * len(stats),
    ]
    for method in summary.get("ranking", []):
        entry = methods[method]
        cells = [_cell(entry["metrics"][s], digits[s], entry["n"]) for s in stats]
        rank = f"{entry.get('rank', '')} ({entry['mean_rank']:.2f})" if "mean_rank" in entry else entry.get("rank", "")
        lines.append(f"| {rank} | {method} | {entry['n']} | " + " | ".join(cells) + " |")
    gaps = [m for m in summary.get("ranking", []) if "gap_to_random" in methods[m]]
    if gaps:
        lines += ["", "Gap to random (method − random, paired by image):", ""]
        lines += ["| method | n | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(stats)]
        for method in gaps:
            gap = methods[method]["gap_to_random"]
            n = max((g["n"] for g in gap.values()), default=0)
            cells = [_cell(gap[s], digits[s], n) for s in stats]
            lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines + _mprt_table(summary))


def _mprt_table(summary: dict[str, Any]) -> list[str]:
    """Each method's MPRT verdict: does its map change when the model is randomised?"""
    verdicts = [
        (m, summary["methods"][m]["mprt"]) for m in summary.get("ranking", []) if "mprt" in summary["methods"][m]
    ]
    if not verdicts:
        return []
    threshold = verdicts[0][1]["threshold"]
    lines = ["", f"MPRT sanity check (rank correlation with the trained model's map after randomising every "
             f"block; pass: its 95% interval lies below {threshold}):", "",
             "| method | rank corr. | SSIM | verdict |", "|---|---|---|---|"]  # fmt: skip
    for method, v in verdicts:
        ssim = "-" if v.get("ssim") is None else f"{v['ssim']:.3f}"
        lines.append(f"| {method} | {v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}] | {ssim} | {v['verdict']} |")
    return lines


__all__ = ["evaluate", "format_summary"]
