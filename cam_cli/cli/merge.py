"""``camx merge``: the shards' manifest parts joined into one manifest."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cam_cli.cli.common import CONTEXT, EXIT_FAILED_INPUTS, reported_errors
from cam_cli.errors import plural


@click.command(context_settings=CONTEXT)
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
    click.echo(
        f"camx: merged {plural(len(parts), 'part')} into {out_dir / 'manifest.jsonl'} ({plural(count, 'line')})",
        err=True,
    )
    gaps = rundir.part_warnings(parts)
    for gap in gaps:
        click.echo(f"camx: warning: {gap}", err=True)
    if gaps:
        sys.exit(EXIT_FAILED_INPUTS)
