"""What a run does to the results already in OUT: another model is refused before
anything is written, runs with different targets keep their own lines, no file is
left that the manifest does not describe, and camx output folders inside the inputs
are not read as images. Through the real ``camx explain`` (click's runner)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cam_cli import rundir
from cam_cli.cli import main

BOOK = {"manifest.jsonl", ".manifest.jsonl.journal"}


@pytest.fixture
def other_factory(tiny_factory: str, tmp_path: Path) -> str:
    """A second model (other weights), importable beside ``tinynet_module``."""
    (tmp_path / "othernet_module.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import make_tiny\n"
        "def build():\n"
        "    return make_tiny(seed=7)\n"
    )
    sys.modules.pop("othernet_module", None)
    return "othernet_module:build"


def explain(images: Path, out: Path, *extra: str, model: str = "tinynet_module:build") -> tuple[int, str]:
    result = CliRunner().invoke(
        main,
        ["explain", str(images), "-o", str(out), "--model", model, "--device", "cpu", "--workers", "0", "-q", *extra],
    )
    return result.exit_code, result.stderr


def snapshot(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def described(out: Path) -> set[str]:
    """Every file the manifest's lines name."""
    return {f for r in rundir.read_records(out / "manifest.jsonl") for f in rundir.record_files(r)}


def outputs(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - BOOK


def test_a_second_model_is_refused_before_anything_is_written(
    image_dir: Path, tmp_path: Path, other_factory: str
) -> None:
    out = tmp_path / "out"
    assert explain(image_dir, out, "--method", "gradcam,eigencam")[0] == 0
    before = snapshot(out)
    code, stderr = explain(image_dir, out, "--method", "gradcam", model=other_factory)
    assert code == 1
    message = stderr.strip()
    assert "\n" not in message and "another model" in message
    assert "tinynet_module:build" in message and "othernet_module:build" in message
    assert "another -o" in message and "--overwrite" in message
    assert snapshot(out) == before  # nothing written, nothing replaced


def test_overwrite_replaces_the_other_models_lines_and_files(
    image_dir: Path, tmp_path: Path, other_factory: str
) -> None:
    out = tmp_path / "out"
    assert explain(image_dir, out, "--method", "gradcam,eigencam")[0] == 0
    assert any(".eigencam." in f for f in outputs(out))
    code, stderr = explain(image_dir, out, "--method", "gradcam", "--overwrite", model=other_factory)
    assert code == 0, stderr
    records = list(rundir.read_records(out / "manifest.jsonl"))
    assert {r["model"] for r in records} == {other_factory} and {r["method"] for r in records} == {"gradcam"}
    assert outputs(out) == described(out)  # the first model's eigencam maps went with their lines


def test_runs_with_different_targets_keep_their_own_lines(image_dir: Path, tmp_path: Path, tiny_factory: str) -> None:
    out = tmp_path / "out"
    assert explain(image_dir, out, "--target", "top3")[0] == 0
    assert explain(image_dir, out)[0] == 0  # top1 into the same OUT
    records = list(rundir.read_records(out / "manifest.jsonl"))
    assert sorted(r["target"] for r in records) == ["top1"] * 6 + ["top3"] * 6
    assert all(len(r["targets"]) == 3 for r in records if r["target"] == "top3")
    assert outputs(out) == described(out)
    before = snapshot(out)
    assert explain(image_dir, out, "--target", "top3")[0] == 0  # a rerun of either redoes nothing
    assert snapshot(out) == before
    # top2 with the same settings shares top1..top2 with the top3 lines: the same files
    assert explain(image_dir, out, "--target", "top2")[0] == 0
    assert len(list(rundir.read_records(out / "manifest.jsonl"))) == 18
    assert outputs(out) == described(out)


def test_a_target_that_would_rewrite_another_targets_files_differently_is_refused(
    image_dir: Path, tmp_path: Path, tiny_factory: str
) -> None:
    out = tmp_path / "out"
    assert explain(image_dir, out, "--target", "top3")[0] == 0
    before = snapshot(out)
    code, stderr = explain(image_dir, out, "--target", "top2", "--alpha", "0.7")
    assert code == 1 and "--target top3" in stderr and "--overwrite" in stderr
    assert snapshot(out) == before
    code, stderr = explain(image_dir, out, "--target", "top2", "--alpha", "0.7", "--overwrite")
    assert code == 0, stderr
    assert {r["target"] for r in rundir.read_records(out / "manifest.jsonl")} == {"top2"}
    assert outputs(out) == described(out)  # the top3 lines' third maps went with them


def test_a_redo_in_another_format_leaves_no_undescribed_file(
    image_dir: Path, tmp_path: Path, tiny_factory: str
) -> None:
    out = tmp_path / "out"
    assert explain(image_dir, out)[0] == 0
    assert explain(image_dir, out, "--format", "png")[0] == 0
    assert not any(f.endswith(".jpg") for f in outputs(out) if ".gradcam." in f)
    assert outputs(out) == described(out)


def test_camx_output_folders_inside_the_inputs_are_skipped(image_dir: Path, tmp_path: Path, tiny_factory: str) -> None:
    inner = image_dir / "out"
    assert explain(image_dir, inner)[0] == 0
    code, stderr = explain(image_dir, tmp_path / "elsewhere", "--json")
    assert code == 0
    keys = {r["key"] for r in rundir.read_records(tmp_path / "elsewhere" / "manifest.jsonl")}
    assert len(keys) == 6 and not any(k.startswith("out/") for k in keys)
    assert "skipped 1 folder" in stderr and str(inner) in stderr and "as an INPUT" in stderr
    # named as an input, it is read
    assert explain(inner, tmp_path / "third")[0] == 0
    third = {r["key"] for r in rundir.read_records(tmp_path / "third" / "manifest.jsonl")}
    assert "a.jpg.gradcam.jpg" in third
    # a folder with only a journal (a run in progress or killed) is an output folder too
    (inner / "manifest.jsonl").rename(inner / "kept.jsonl")
    (inner / ".manifest.jsonl.journal").write_text(json.dumps({"input": "x"}) + "\n")
    code, stderr = explain(image_dir, tmp_path / "fourth")
    assert code == 0 and "skipped 1 folder" in stderr
