"""``camx report OUT``: the static HTML gallery of a run (torch is never imported)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cam_cli.cli.common import CONTEXT, reported_errors
from cam_cli.errors import plural


@click.command("report", context_settings=CONTEXT)
@click.argument("out_dir", metavar="OUT", type=click.Path(path_type=Path, file_okay=True, dir_okay=True))
@click.option(
    "-o",
    "--out",
    "dest",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder to write the page into (created if missing).  [default: OUT/report]",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the page, counts, seconds) instead.")
def report(out_dir: Path, dest: Path | None, quiet: bool, as_json: bool) -> None:
    """Lay the run in OUT out as a page to open in any browser, offline.

    Writes index.html with its stylesheet, script and thumbnails beside it:
    the run's settings, per-method metrics when camx evaluate ran, and one
    card per input with the original and each method's overlay (click for
    full size); filters, search, sorting and a list of failed inputs. A
    re-run only makes thumbnails that are new or changed. Prints the page's
    path.

    \b
    Example:
        camx report ./out && xdg-open ./out/report/index.html
    """
    from cam_cli.report import make_report

    with reported_errors(as_json):
        summary = make_report(out_dir, dest, quiet=quiet or as_json)
    if summary.missing_overlays:
        overlays = plural(summary.missing_overlays, "overlay")
        click.echo(
            f"camx: note: {overlays} named in the manifest of {out_dir} not found there; "
            "their cards show no picture (run camx explain again to redo them)",
            err=True,
        )
    if as_json:
        click.echo(json.dumps(summary.as_dict()))
    else:
        click.echo(str(summary.index))
