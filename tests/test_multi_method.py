"""Several methods in one run through the real CLI: outputs, manifest lines, resume
per (input, method), refusals, and ``camx methods``."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from cam_cli import images, rundir
from cam_cli.cli import main
from cam_cli.methods import method_names

ARGS = ["--weights", "NONE", "--device", "cpu", "-q", "--json", "--workers", "0"]
MLP_HEAD = """
import torch
from torch import nn

class MLPHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))

def build():
    torch.manual_seed(0)
    return MLPHead().eval()
"""


def run(images: Path, out: Path, model: str, *extra: str) -> tuple[int, dict, str]:
    result = CliRunner().invoke(main, ["explain", str(images), "-o", str(out), "--model", model, *ARGS, *extra])
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return result.exit_code, (json.loads(lines[-1]) if lines else {}), result.output


def manifest(out: Path) -> dict[tuple[str, str], dict]:
    return rundir.load_manifest(out / "manifest.jsonl")


def test_four_methods_in_one_run_write_every_output_and_equal_each_alone(image_dir, tiny_factory, tmp_path):
    out = tmp_path / "out"
    methods = ["gradcam", "gradcam++", "layercam", "eigencam"]
    code, summary, output = run(image_dir, out, tiny_factory, "--method", ",".join(methods))
    assert code == 0, output
    keys = [image.key for image in images.discover([image_dir])]
    assert summary["done"] == len(keys) and summary["methods"] == methods
    records = manifest(out)
    assert sorted(records) == sorted((k, m) for k in keys for m in methods)
    for key in keys:
        for method in methods:
            record = records[(key, method)]
            assert record["status"] == "ok"
            assert (out / f"{key}.{method}.jpg").is_file() and (out / f"{key}.{method}.npy").is_file()
        assert records[(key, "eigencam")]["class_agnostic"] is True
        assert "class_agnostic" not in records[(key, "gradcam")]
        assert records[(key, "eigencam")]["class_index"] == records[(key, "gradcam")]["class_index"]
    for method in methods:  # each alone gives the same maps
        alone = tmp_path / f"alone-{method}"
        code, _, output = run(image_dir, alone, tiny_factory, "--method", method)
        assert code == 0, output
        for key in keys:
            np.testing.assert_allclose(
                np.load(out / f"{key}.{method}.npy"), np.load(alone / f"{key}.{method}.npy"), atol=1e-5
            )


def test_repeating_method_is_the_same_as_a_comma_list(image_dir, tiny_factory, tmp_path):
    code, summary, output = run(image_dir, tmp_path / "a", tiny_factory, "--method", "fem", "--method", "cam,fem")
    assert code == 0, output
    assert summary["methods"] == ["fem", "cam"]
    assert {m for _, m in manifest(tmp_path / "a")} == {"fem", "cam"}


def test_adding_a_method_computes_only_the_new_one(image_dir, tiny_factory, tmp_path):
    out = tmp_path / "out"
    code, _, output = run(image_dir, out, tiny_factory, "--method", "gradcam")
    assert code == 0, output
    before = {str(p): p.stat().st_mtime_ns for p in out.rglob("*.gradcam.*")}
    assert len(before) == 12
    code, summary, output = run(image_dir, out, tiny_factory, "--method", "gradcam,hirescam")
    assert code == 0, output
    assert summary["done"] == len(before) // 2 and summary["skipped"] == 0
    after = {str(p): p.stat().st_mtime_ns for p in out.rglob("*.gradcam.*")}
    assert after == before, "the complete Grad-CAM outputs were rewritten"
    assert len(list(out.rglob("*.hirescam.npy"))) == len(before) // 2
    code, summary, output = run(image_dir, out, tiny_factory, "--method", "hirescam,gradcam")
    assert code == 0, output
    assert summary["skipped"] == len(before) // 2 and summary["done"] == 0


def test_class_agnostic_methods_write_one_map_for_top_k(image_dir, tiny_factory, tmp_path):
    out = tmp_path / "out"
    code, _, output = run(image_dir, out, tiny_factory, "--method", "gradcam,fem,random", "--target", "top2")
    assert code == 0, output
    records = manifest(out)
    key = "a.jpg"
    assert [t["overlay"] for t in records[(key, "gradcam.top2")]["targets"]] == [
        f"{key}.gradcam.top1.jpg",
        f"{key}.gradcam.top2.jpg",
    ]
    for method in ("fem", "random"):
        record = records[(key, method)]
        assert record["overlay"] == f"{key}.{method}.jpg" and len(record["targets"]) == 1
        assert record["class_index"] == records[(key, "gradcam.top2")]["targets"][0]["class_index"]
        assert record["target"] == "top1" and record["class_agnostic"] is True


def test_random_is_the_same_for_the_same_command_and_follows_seed(image_dir, tiny_factory, tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "5")):
        code, _, output = run(image_dir, tmp_path / name, tiny_factory, "--method", "random", "--seed", seed)
        assert code == 0, output
    a, b, c = (np.load(tmp_path / n / "a.jpg.random.npy") for n in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert manifest(tmp_path / "c")[("a.jpg", "random")]["seed"] == 5


def test_a_changed_method_option_redoes_only_that_method(image_dir, tiny_factory, tmp_path):
    out = tmp_path / "out"
    code, _, output = run(image_dir, out, tiny_factory, "--method", "gradcam,finercam")
    assert code == 0, output
    code, summary, output = run(image_dir, out, tiny_factory, "--method", "gradcam,finercam", "--finer-gamma", "0.5")
    assert code == 0, output
    assert summary["done"] == 6 and summary["skipped"] == 0
    assert manifest(out)[("a.jpg", "finercam")]["finer_gamma"] == 0.5


def test_unknown_method_is_bad_usage_with_a_suggestion(image_dir, tiny_factory, tmp_path):
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["explain", str(image_dir), "-o", str(out), "--method", "gradcam,gradcampp"])
    assert result.exit_code == 2, result.output
    assert "gradcam++" in result.output and "camx methods" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "gradcam,eigencam", "--eigen-smooth"], "--eigen-smooth does not apply to eigencam"),
        (["--method", "finercam", "--aug-smooth"], "--aug-smooth does not apply to finercam"),
        (["--method", "fullgrad", "--layer", "features"], "--layer does not apply to fullgrad"),
    ],
)
def test_options_that_do_not_apply_are_refused_in_one_line(image_dir, tiny_factory, tmp_path, extra, message):
    out = tmp_path / "out"
    code, _, output = run(image_dir, out, tiny_factory, *extra)
    assert code == 1, output
    errors = [line for line in output.splitlines() if line.startswith("camx: error:")]
    assert len(errors) == 1 and message in errors[0], output
    assert not out.exists()


def test_cam_on_a_head_it_cannot_read_is_refused_before_anything_runs(image_dir, tmp_path, monkeypatch):
    (tmp_path / "mlp_module.py").write_text(MLP_HEAD)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    code, _, output = run(image_dir, out, "mlp_module:build", "--method", "gradcam,cam")
    assert code == 1, output
    assert "camx: error: cam: CAM needs a head" in output and "Linear -> Tanh -> Linear" in output
    assert not out.exists()


def test_eigen_and_aug_smooth_are_recorded_and_change_the_maps(image_dir, tiny_factory, tmp_path):
    code, _, output = run(image_dir, tmp_path / "plain", tiny_factory, "--method", "gradcam")
    assert code == 0, output
    code, _, output = run(image_dir, tmp_path / "smooth", tiny_factory, "--method", "gradcam", "--aug-smooth",
                          "--eigen-smooth")  # fmt: skip
    assert code == 0, output
    record = manifest(tmp_path / "smooth")[("a.jpg", "gradcam")]
    assert record["aug_smooth"] is True and record["eigen_smooth"] is True
    plain, smooth = (np.load(tmp_path / n / "a.jpg.gradcam.npy") for n in ("plain", "smooth"))
    assert plain.shape == smooth.shape == (45, 67)
    assert np.abs(plain - smooth).max() > 1e-3 and smooth.max() == pytest.approx(1.0)


def test_fullgrad_records_no_layer(image_dir, tiny_factory, tmp_path):
    code, _, output = run(image_dir, tmp_path / "o", tiny_factory, "--method", "fullgrad,gradcam")
    assert code == 0, output
    records = manifest(tmp_path / "o")
    assert records[("a.jpg", "fullgrad")]["layer"] is None
    assert records[("a.jpg", "gradcam")]["layer"] == "features"
    assert np.load(tmp_path / "o" / "a.jpg.fullgrad.npy").shape == (45, 67)


def test_methods_lists_every_registered_method():
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.splitlines()[1:] if not line.startswith("*")]
    assert listed == method_names()
    result = CliRunner().invoke(main, ["methods", "--json"])
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["name"] for r in rows] == method_names()
    by_name = {r["name"]: r for r in rows}
    assert by_name["gradcam"]["backwards"] == 1 and by_name["eigencam"]["backwards"] == 0
    assert by_name["fem"]["class_specific"] is False and by_name["fullgrad"]["uses_layer"] is False
    assert "camx methods" in CliRunner().invoke(main, ["explain", "--help"]).output


ZERO_HEAD = """
import sys
sys.path.insert(0, {tests!r})
import torch
from conftest import make_tiny

def build():
    model = make_tiny()
    with torch.no_grad():
        model.fc.weight.zero_()  # as torchvision starts ViT's head: every score is the bias
    return model
"""


def test_flat_maps_are_flagged_warned_and_counted(image_dir, tmp_path, monkeypatch):
    (tmp_path / "zero_module.py").write_text(ZERO_HEAD.format(tests=str(Path(__file__).parent)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["explain", str(image_dir), "-o", str(out), "--model", "zero_module:build",
                                       "--weights", "NONE", "--device", "cpu", "--workers", "0", "--json",
                                       "--method", "gradcam,eigencam"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["flat"] == 6, "Grad-CAM of a zero head is flat for every image; Eigen-CAM is not"
    assert "warning: 6 maps are flat" in result.stderr
    records = manifest(out)
    assert all(records[(k, "gradcam")]["flat"] is True for k, _ in records if _ == "gradcam")
    assert not any(r.get("flat") for (k, m), r in records.items() if m == "eigencam")
    assert float(np.load(out / "a.jpg.gradcam.npy").max()) == 0.0


def test_a_fixed_target_keeps_the_top1_outputs_and_has_its_own(image_dir, tiny_factory, tmp_path):
    out = tmp_path / "out"
    code, _, output = run(image_dir, out, tiny_factory, "--method", "gradcam")
    assert code == 0, output
    top1 = {str(p): p.stat().st_mtime_ns for p in out.rglob("*.gradcam.*")}
    code, summary, output = run(image_dir, out, tiny_factory, "--method", "gradcam", "--target", "3")
    assert code == 0, output
    assert summary["done"] == 6 and summary["skipped"] == 0
    assert {str(p): p.stat().st_mtime_ns for p in out.rglob("*.gradcam.jpg") if ".class" not in p.name} | {
        str(p): p.stat().st_mtime_ns for p in out.rglob("*.gradcam.npy") if ".class" not in p.name
    } == top1
    records = manifest(out)
    assert records[("a.jpg", "gradcam")]["target"] == "top1"
    fixed = records[("a.jpg", "gradcam.class3")]
    assert fixed["class_index"] == 3 and fixed["overlay"] == "a.jpg.gradcam.class3.jpg"
    assert (out / "a.jpg.gradcam.class3.npy").is_file()
    # both are complete now: the same commands skip everything
    for extra in ([], ["--target", "3"]):
        code, summary, output = run(image_dir, out, tiny_factory, "--method", "gradcam", *extra)
        assert code == 0 and summary["skipped"] == 6, output


def test_channels_last_on_the_cpu_leaves_every_map_unchanged(image_dir, tmp_path, monkeypatch):
    methods = "gradcam,gradcam++,layercam,eigencam,cam"
    for flag in ("0", "1"):
        monkeypatch.setenv("CAMX_CHANNELS_LAST", flag)
        code, _, output = run(image_dir, tmp_path / flag, "resnet18", "--input-size", "64", "--method", methods)
        assert code == 0, output
    for path in sorted((tmp_path / "0").rglob("*.npy")):
        other = np.load(tmp_path / "1" / path.relative_to(tmp_path / "0"))
        np.testing.assert_allclose(np.load(path), other, atol=1e-5, err_msg=str(path))
    assert len(list((tmp_path / "0").rglob("*.npy"))) == 6 * 5


def test_every_command_shows_its_whole_first_sentence_in_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    commands = result.output.split("Commands:")[1]
    assert "..." not in commands
    ctx = click.Context(main)
    names = main.list_commands(ctx)
    assert {"explain", "methods", "evaluate", "report", "models", "layers", "merge"} <= set(names)
    for name in names:
        command = main.get_command(ctx, name)
        assert command is not None, name
        first = " ".join((command.help or "").split("\n\n")[0].split())
        assert " ".join(commands.split()).count(first.rstrip(".")) == 1, name


def test_random_weights_are_the_same_model_every_run_and_follow_seed(image_dir, tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "3")):
        code, _, output = run(image_dir, tmp_path / name, "resnet18", "--input-size", "64", "--seed", seed)
        assert code == 0, output
    a, b, c = (manifest(tmp_path / n)[("a.jpg", "gradcam")] for n in "abc")
    assert a["seed"] == 0 and c["seed"] == 3
    np.testing.assert_array_equal(
        np.load(tmp_path / "a" / "a.jpg.gradcam.npy"), np.load(tmp_path / "b" / "a.jpg.gradcam.npy")
    )
    assert (a["class_index"], a["score"]) == (b["class_index"], b["score"])
    assert a["score"] != c["score"]
    # a resume with another seed would mix two models: refused, or with --overwrite redone
    code, _, output = run(image_dir, tmp_path / "a", "resnet18", "--input-size", "64", "--seed", "3")
    assert code == 1 and "another model (seed 0; this run: seed 3)" in output
    code, summary, output = run(image_dir, tmp_path / "a", "resnet18", "--input-size", "64", "--seed", "3",
                                "--overwrite")  # fmt: skip
    assert code == 0 and summary["done"] == 6 and summary["skipped"] == 0, output


def test_explain_report_builds_the_page_at_the_end(image_dir, tiny_factory, tmp_path):
    out = tmp_path / "out"
    code, summary, output = run(image_dir, out, tiny_factory, "--method", "gradcam,fem", "--report")
    assert code == 0, output
    page = out / "report" / "index.html"
    assert summary["report"] == str(page) and page.is_file()
    assert "a.jpg" in page.read_text(encoding="utf-8")


def test_explain_help_shows_no_empty_ranges():
    text = CliRunner().invoke(main, ["explain", "--help"]).output
    assert "None]" not in text and "FINITE FLOAT" not in text
    assert "--mean NUMBER..." in text


def test_kpcacam_options_through_the_cli_are_recorded_and_change_the_map(image_dir, tiny_factory, tmp_path):
    maps = {}
    for kernel in ("sigmoid", "rbf"):
        out = tmp_path / kernel
        code, summary, output = run(image_dir, out, tiny_factory, "--method", "kpcacam,segeigencam,gradcam",
                                    "--kpca-kernel", kernel, "--kpca-gamma", "0.5")  # fmt: skip
        assert code == 0 and summary["done"] == 6, output
        record = manifest(out)[("a.jpg", "kpcacam")]
        assert (record["kpca_kernel"], record["kpca_gamma"], record["class_agnostic"]) == (kernel, 0.5, True)
        maps[kernel] = np.load(out / "a.jpg.kpcacam.npy")
        assert maps[kernel].max() == 1.0
        assert (
            manifest(out)[("a.jpg", "segeigencam")]["class_index"] == manifest(out)[("a.jpg", "gradcam")]["class_index"]
        )
    assert not np.allclose(maps["sigmoid"], maps["rbf"])
