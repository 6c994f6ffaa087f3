"""The table behind ``camx models``: for every supported model, whether CAM
applies, the default target layer and the input size.

Each row comes from the model's own structure (``cam_cli.probe``), probed
with random weights at the input size of its default weights.  Probing all of
torchvision takes minutes, so the rows are computed once and shipped as
``catalog.json`` beside this file; regenerate it after a torchvision upgrade::

    python -m cam_cli.catalog --write

Models that the installed torchvision has and the table lacks are probed on
the spot, so the listing always matches ``torchvision.models.list_models``.

timm registers over a thousand architectures: ``camx models --source timm``
lists them with the input size of their pretrained config, read without
building anything; ``--probe`` builds and inspects the ones a pattern selects.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cam_cli.errors import ModelError
from cam_cli.models import load_classifier, supported_models
from cam_cli.probe import cam_head, default_target, head_description, run_probe

TABLE = Path(__file__).with_name("catalog.json")


def describe_model(name: str) -> dict[str, Any]:
    """One row, probed now: ``model``, ``cam``, ``layer``, ``input_size``, ``reason``."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classifier = load_classifier(name, "NONE")
    probe = run_probe(classifier)
    target = default_target(probe)
    if classifier.task != "classification":  # the rows of classifiers carry no task: classification
        why = f"a {classifier.task} model: the head is convolutional, not a global average pool"
        return {"model": name, "task": classifier.task, "cam": False, "layer": target.label,
                "input_size": classifier.input_size, "reason": why}  # fmt: skip
    try:
        cam_head(probe, target)
        cam, reason = True, None
    except ModelError:
        cam = False
        if target.layout == "tokens":
            reason = "a transformer: the head reads tokens, not a global average pool"
        else:
            reason = f"head: {head_description(probe, target)}"
    return {"model": name, "cam": cam, "layer": target.label, "input_size": classifier.input_size, "reason": reason}


def read_table(path: Path = TABLE) -> dict[str, dict[str, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {row["model"]: row for row in rows}


def describe_models(live: bool = False, pattern: str | None = None) -> Iterator[dict[str, Any]]:
    """A row for every supported model matching ``pattern`` (fnmatch), from the shipped table
    unless ``live``; one at a time, each model built only when its row is asked for."""
    table = {} if live else read_table()
    for name in supported_models():
        if pattern is None or fnmatch.fnmatch(name, pattern):
            yield table.get(name) or describe_model(name)


def describe_timm_models(pattern: str | None = None, live: bool = False) -> Iterator[dict[str, Any]]:
    """A row for every timm architecture matching ``pattern`` (fnmatch); probed when ``live``,
    one at a time."""
    from cam_cli.models.timm_models import import_timm, timm_names

    timm = import_timm()  # now: without timm, the error comes before any row
    names = [n for n in timm_names() if pattern is None or fnmatch.fnmatch(n, pattern)]

    def rows() -> Iterator[dict[str, Any]]:
        for name in names:
            if live:
                yield describe_model(f"timm:{name}")
                continue
            cfg = timm.models.get_pretrained_cfg(name)
            size = getattr(cfg, "input_size", None) or (3, 224, 224)
            yield {"model": f"timm:{name}", "cam": None, "layer": None, "input_size": int(size[-1]), "reason": None}

    return rows()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cam_cli.catalog", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"probe every model and write {TABLE.name}")
    parser.add_argument("models", nargs="*", help="probe only these models (and print their rows)")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models or supported_models():
        row = describe_model(name)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    if args.write:
        table = {**read_table(), **{row["model"]: row for row in rows}}
        merged = [table[name] for name in supported_models() if name in table]
        TABLE.write_text("[\n" + ",\n".join(json.dumps(row) for row in merged) + "\n]\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
