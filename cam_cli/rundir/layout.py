"""The run folder OUT: the name of every file camx writes there, and the one
reader of every record of OUT. Torch-free.

::

    OUT/KEY.METHOD.FMT, OUT/KEY.METHOD.npy       overlay and map of one input and method
    OUT/KEY.METHOD.topR.FMT / .npy               --target topK: one pair per rank R
    OUT/KEY.METHOD.classC.FMT / .npy             a fixed --target class C
    OUT/KEY.METHOD[.topR|.classC].grad.npy       guided-backprop, guided-gradcam: the 3-channel
                                                 image behind the map (beside each .npy)
    OUT/manifest.jsonl                           one line per input and method
    OUT/manifest.shard-K-of-N.jsonl              the line of shard K of N (--shard, torchrun)
    OUT/.NAME.journal                            lines appended while a run writes NAME
    OUT/metrics.jsonl, OUT/metrics-summary.json  camx evaluate
    OUT/metrics.other-MODEL.jsonl (and summary)  camx evaluate --with-other-model
    OUT/mprt/KEY.METHOD.npy                      evaluate --metrics mprt: one input's small maps,
                                                 trained then each randomisation depth
    OUT/report/                                  camx report
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cam_cli.errors import InputError, OutputError
from cam_cli.rundir.records import RecordKey, journal_path, load_manifest, read_records, record_key, write_manifest

MANIFEST = "manifest.jsonl"
METRICS = "metrics.jsonl"
METRICS_SUMMARY = "metrics-summary.json"
REPORT = "report"
MPRT_STRIPS = "mprt"
SHARD_PART = re.compile(r"manifest\.shard-(\d+)-of-(\d+)\.jsonl")


def metrics_names(other_model: str | None = None) -> tuple[str, str]:
    """``metrics.jsonl`` and ``metrics-summary.json``; for scores made with a model other
    than the run's (``evaluate --with-other-model``), names of their own beside them,
    ``metrics.other-MODEL.jsonl``, so that they never mix with the run's own."""
    if other_model is None:
        return METRICS, METRICS_SUMMARY
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "-", other_model).strip("-.")[:80] or "model"
    return f"metrics.other-{slug}.jsonl", f"metrics-summary.other-{slug}.json"


def mprt_strip_name(key: str, method: str) -> str:
    """Where ``evaluate --metrics mprt`` keeps one input's maps across randomisation depths."""
    return f"{MPRT_STRIPS}/{key}.{method}.npy"


def manifest_name(shard: tuple[int, int] = (1, 1)) -> str:
    """The manifest a run of shard ``(K, N)`` writes: ``manifest.jsonl`` unsharded."""
    k, n = shard
    return MANIFEST if n == 1 else f"manifest.shard-{k}-of-{n}.jsonl"


def output_names(key: str, method: str, fmt: str, count: int, variant: str | None = None) -> list[tuple[str, str]]:
    """(overlay, map) paths relative to OUT for each of ``count`` targets; a fixed
    ``--target`` class has names of its own (``KEY.METHOD.class281.jpg``)."""
    if variant:
        return [(f"{key}.{method}.{variant}.{fmt}", f"{key}.{method}.{variant}.npy")]
    if count == 1:
        return [(f"{key}.{method}.{fmt}", f"{key}.{method}.npy")]
    return [(f"{key}.{method}.top{r}.{fmt}", f"{key}.{method}.top{r}.npy") for r in range(1, count + 1)]


def gradient_name(map_rel: str) -> str:
    """The 3-channel gradient file beside a map (guided methods): ``KEY.METHOD.npy`` ->
    ``KEY.METHOD.grad.npy``, ``KEY.METHOD.top2.npy`` -> ``KEY.METHOD.top2.grad.npy``."""
    return f"{map_rel.removesuffix('.npy')}.grad.npy"


def is_run_folder(names: Sequence[str]) -> bool:
    """Whether a folder with these entry names is a camx output folder: it holds a
    manifest, a manifest part or a run's journal."""
    return any(
        name == MANIFEST or SHARD_PART.fullmatch(name) or (name.startswith(".manifest") and name.endswith(".journal"))
        for name in names
    )


def shard_parts(out_dir: Path) -> list[Path]:
    """The manifest parts of ``out_dir``, also those of shards killed before they
    wrote one (whose records are only in the part's journal)."""
    parts = {p for p in out_dir.glob("manifest.shard-*-of-*.jsonl") if SHARD_PART.fullmatch(p.name)}
    for journal in out_dir.glob(".manifest.shard-*-of-*.jsonl.journal"):
        name = journal.name[1 : -len(".journal")]
        if SHARD_PART.fullmatch(name):
            parts.add(out_dir / name)
    return sorted(parts)


def part_warnings(parts: Sequence[Path]) -> list[str]:
    """What a merge of ``parts`` lacks: shards with no part, parts of several shardings."""
    by_count: dict[int, set[int]] = {}
    for part in parts:
        match = SHARD_PART.fullmatch(part.name)
        if match:
            by_count.setdefault(int(match[2]), set()).add(int(match[1]))
    found: list[str] = []
    if len(by_count) > 1:
        counts = ", ".join(f"--shard K/{n}" for n in sorted(by_count))
        found.append(f"parts of {len(by_count)} different shardings ({counts}) in one folder; merged all of them")
    for count, present in sorted(by_count.items()):
        missing = [f"{k}/{count}" for k in range(1, count + 1) if k not in present]
        if missing:
            found.append(
                f"no manifest part of shard {', '.join(missing)}: its images are not in the merged manifest "
                "(run it, then merge again)"
            )
    return found


def merge_manifests(out_dir: Path, parts: Sequence[Path], target: Path | None = None) -> int:
    """Join manifest parts (and their journals) into ``target`` (``OUT/manifest.jsonl``);
    returns the line count."""
    target = target or out_dir / MANIFEST
    if not parts:
        raise InputError(f"no manifest parts (manifest.shard-K-of-N.jsonl) in {out_dir}")
    records: dict[RecordKey, dict[str, Any]] = {}
    for part in parts:
        records.update(load_manifest(part))
    if target.exists():
        # Keep lines of the target that no part speaks of (an earlier unsharded run).
        for record in read_records(target):
            records.setdefault(record_key(record), record)
    try:
        write_manifest(target, records)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror}") from None
    return len(records)


@dataclass
class RunRecords:
    """Every manifest record of OUT by :func:`record_key`, and the files they came from."""

    records: dict[RecordKey, dict[str, Any]]
    sources: list[Path]


def read_run(out_dir: Path, on_top: Path | None = None, *, required: bool = True) -> RunRecords:
    """Every record of OUT: the shard parts (sorted, with their journals), then
    ``manifest.jsonl`` (with its journal), then ``on_top`` (the manifest of the run
    reading them), each later one replacing the records of the same key.

    With ``required``, a missing folder, one without any manifest, or one whose
    manifests hold no records raises ``InputError`` in one line.
    """
    if required and not out_dir.is_dir():
        what = "does not exist" if not out_dir.exists() else "is not a folder"
        raise InputError(f"{out_dir} {what}; give the output folder of a camx explain run")
    manifest = out_dir / MANIFEST
    files = [*shard_parts(out_dir), manifest] if out_dir.is_dir() else []
    if on_top is not None:
        files = [f for f in files if f != on_top] + [on_top]
    records: dict[RecordKey, dict[str, Any]] = {}
    sources: list[Path] = []
    for path in files:
        records.update(load_manifest(path))
        sources.extend(p for p in (path, journal_path(path)) if p.is_file())
    if required and not sources:
        raise InputError(
            f"no manifest in {out_dir} (manifest.jsonl or manifest.shard-K-of-N.jsonl); "
            f"run camx explain IMAGES -o {out_dir} first"
        )
    if required and not records:
        raise InputError(f"the manifest of {out_dir} has no lines; run camx explain IMAGES -o {out_dir} first")
    return RunRecords(records, sources)
