"""`camx explain` end to end: outputs, manifest, the console script, error paths and exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import camx_script, write_image
from PIL import Image

from cam_cli.cli import main

FAST = ["--model", "resnet18", "--weights", "NONE", "--input-size", "64", "--device", "cpu", "--workers", "0"]
REQUIRED_KEYS = {
    "input",
    "status",
    "error",
    "overlay",
    "map",
    "class_index",
    "class_name",
    "score",
    "method",
    "model",
    "layer",
    "width",
    "height",
}


def invoke(*args: str) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_every_image_gets_an_overlay_a_map_and_a_manifest_line(image_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke("explain", image_dir, "-o", out, *FAST, "-q", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    records = manifest(out)
    assert len(records) == 6
    assert [r["input"] for r in records] == sorted(r["input"] for r in records)
    for record in records:
        assert record.keys() >= REQUIRED_KEYS
        assert record["status"] == "ok" and record["error"] is None
        assert record["method"] == "gradcam" and record["model"] == "resnet18" and record["layer"] == "layer4"
        assert 0.0 <= record["score"] <= 1.0 and 0 <= record["class_index"] < 1000
        source = Image.open(record["input"])
        assert (record["width"], record["height"]) == source.size
        overlay = Image.open(out / record["overlay"])
        assert overlay.size == source.size and overlay.mode == "RGB"
        cam = np.load(out / record["map"])
        assert cam.dtype == np.float32 and cam.shape == (source.size[1], source.size[0])
        assert cam.min() == 0.0 and cam.max() == 1.0
    assert (out / "sub" / "d.jpeg.gradcam.jpg").is_file()
    assert (out / "sub" / "d.jpeg.gradcam.npy").is_file()
    assert not list(out.rglob("*.camx-tmp")) and not list(out.glob(".*journal"))


def test_installed_console_script_runs_cam_with_png_and_json(image_dir, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [
            camx_script(),
            "explain",
            str(image_dir),
            "-o",
            str(out),
            *FAST,
            "--method",
            "cam",
            "--format",
            "png",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["done"] == 6 and summary["failed"] == 0 and summary["manifest"] == str(out / "manifest.jsonl")
    assert "6 done" in run.stderr
    for record in manifest(out):
        assert record["overlay"].endswith(".cam.png") and record["layer"] == "layer4"
        assert Image.open(out / record["overlay"]).format == "PNG"


def test_python_dash_m_works(tmp_path):
    run = subprocess.run([sys.executable, "-m", "cam_cli", "--version"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "camx" in run.stdout


def test_same_input_same_names_whatever_else_is_in_the_folder(image_dir, tmp_path):
    alone = tmp_path / "alone"
    write_image(alone / "sub" / "d.jpeg", 90, 50, 4)
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert invoke("explain", alone, "-o", out_a, *FAST, "-q").exit_code == 0
    assert invoke("explain", image_dir, "-o", out_b, *FAST, "-q").exit_code == 0
    assert (out_a / "sub" / "d.jpeg.gradcam.npy").is_file() and (out_b / "sub" / "d.jpeg.gradcam.npy").is_file()


def test_a_corrupt_file_is_reported_and_the_rest_is_done(image_dir, tmp_path):
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (image_dir / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    result = invoke("explain", image_dir, "-o", out, *FAST)
    assert result.exit_code == 3, result.output
    records = {Path(r["input"]).name: r for r in manifest(out)}
    assert len(records) == 8
    assert records["broken.jpg"]["status"] == "error" and records["broken.jpg"]["overlay"] is None
    assert records["empty.png"]["error"] == "empty file (0 bytes)"
    assert sum(r["status"] == "ok" for r in records.values()) == 6
    assert "broken.jpg" in result.output and "\n" not in records["broken.jpg"]["error"]


def test_target_by_class_name_from_a_labels_file(image_dir, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(1000)))
    out = tmp_path / "out"
    result = invoke("explain", image_dir, "-o", out, *FAST, "-q", "--labels", labels, "--target", "class 7")
    assert result.exit_code == 0, result.output
    assert {(r["class_index"], r["class_name"]) for r in manifest(out)} == {(7, "class 7")}
    # the same class by index, however it is written, finds the work complete
    again = invoke("explain", image_dir, "-o", out, *FAST, "-q", "--labels", labels, "--target", "007", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["skipped"] == 6, again.output
    assert {r["target"] for r in manifest(out)} == {"7"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "resnet5"], "unknown model 'resnet5' (did you mean resnet50"),
        (["--layer", "layer9"], "unknown layer 'layer9'"),
        (["--device", "cuda:3"], "not available"),
        (["--target", "no such class"], "no class names"),
        (["--target", "1000"], "out of range"),
        (
            ["--method", "cam", "--model", "mobilenet_v3_small"],
            "Linear -> Hardswish -> Dropout -> Linear; use --method gradcam",
        ),
    ],
)
def test_fatal_errors_give_one_line_exit_1_and_write_nothing(image_dir, tmp_path, extra, message):
    out = tmp_path / "out"
    args = [*FAST[:-2], "--workers", "0"]
    # later options win in click: the parametrised ones override FAST's
    result = invoke("explain", image_dir, "-o", out, *args, *extra)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert result.output.count("\n") == 1 and result.output.startswith("camx: error: ")
    assert not out.exists()


def test_no_images_found(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    result = invoke("explain", tmp_path / "empty", "-o", tmp_path / "out", *FAST)
    assert result.exit_code == 1 and "no images found" in result.output
    assert not (tmp_path / "out").exists()


def test_unreadable_weights_file(image_dir, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a checkpoint")
    result = invoke("explain", image_dir, "-o", tmp_path / "out", *FAST, "--weights", junk)
    assert result.exit_code == 1 and "cannot read weights" in result.output
    assert not (tmp_path / "out").exists()


def test_output_folder_that_cannot_be_created(image_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    result = invoke("explain", image_dir, "-o", blocker / "out", *FAST)
    assert result.exit_code == 1 and "is not a folder" in result.output
    assert blocker.read_text() == "a file where a folder should be"


def test_default_weights_offline_say_where_to_put_the_file(image_dir, tmp_path, torch_home):
    result = invoke("explain", image_dir, "-o", tmp_path / "out", "--model", "resnet18", "--device", "cpu")
    assert result.exit_code == 1, result.output
    expected = torch_home / "hub" / "checkpoints"
    assert f"put resnet18-f37072fd.pth in {expected}" in result.output and "--weights PATH" in result.output
    # with --json, stdout holds the error object alone (torch.hub's "Downloading:" line goes to stderr)
    as_json = invoke("explain", image_dir, "-o", tmp_path / "out", "--model", "resnet18", "--device", "cpu", "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["exit_status"] == 1 and len(as_json.stdout.splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["explain", "-o", "out"],  # no input
        ["explain", "x", "-o", "out", "--alpha", "1.5"],
        ["explain", "x", "-o", "out", "--method", "nosuchcam"],
        ["explain", "x", "-o", "out", "--device", "gpu"],
        ["explain", "x", "-o", "out", "--shard", "3/2"],
        ["explain", "x"],  # no -o
    ],
)
def test_usage_errors_exit_2(args):
    result = invoke(*args)
    assert result.exit_code == 2, result.output


def test_every_command_has_help_and_is_in_the_readme():
    root = Path(__file__).parent.parent
    readme = "\n".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    ctx = click.Context(main)
    names = main.list_commands(ctx)
    assert {"explain", "methods", "evaluate", "report", "models", "layers", "merge"} <= set(names)
    for name in names:
        command = main.get_command(ctx, name)
        assert command is not None, name
        assert command.help and len(command.help) > 20, name
        assert f"camx {name}" in readme, f"README does not mention camx {name}"
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:
                assert param.help, f"{name} {param.name} has no help"
                assert param.opts[-1] in readme or param.opts[0] in readme, f"README misses {param.opts}"


def test_an_image_too_wide_for_jpeg_fails_alone_and_png_works(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    Image.new("RGB", (66000, 3), (10, 200, 30)).save(folder / "strip.png")
    write_image(folder / "ok.jpg", 40, 30, 1)
    out = tmp_path / "out"
    result = invoke("explain", folder, "-o", out, *FAST, "-q")
    assert result.exit_code == 3, result.output
    records = {Path(r["input"]).name: r for r in manifest(out)}
    assert records["ok.jpg"]["status"] == "ok"
    assert "too large for JPEG" in records["strip.png"]["error"] and "--format png" in records["strip.png"]["error"]
    assert not list(out.glob("strip.png.*")), "no half set of outputs for the failed image"
    result = invoke("explain", folder, "-o", tmp_path / "png", *FAST, "-q", "--format", "png")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "png" / "strip.png.gradcam.npy").shape == (3, 66000)


def test_a_new_alpha_redoes_the_overlays_the_same_alpha_skips(image_dir, tmp_path):
    out = tmp_path / "out"
    assert invoke("explain", image_dir, "-o", out, *FAST, "-q").exit_code == 0
    before = (out / "a.jpg.gradcam.jpg").read_bytes()
    again = invoke("explain", image_dir, "-o", out, *FAST, "--json", "-q")
    assert json.loads(again.output)["skipped"] == 6
    changed = invoke("explain", image_dir, "-o", out, *FAST, "--json", "-q", "--alpha", "0.9")
    assert json.loads(changed.output)["done"] == 6
    assert (out / "a.jpg.gradcam.jpg").read_bytes() != before
    assert {r["alpha"] for r in manifest(out)} == {0.9} and len(manifest(out)) == 6


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_reduced_precision_still_writes_float32_maps(image_dir, tmp_path, method):
    """Only the model runs under autocast; the maps are computed and stored in float32."""
    out = tmp_path / "out"
    result = invoke("explain", image_dir, "-o", out, *FAST, "-q", "--precision", "bf16", "--method", method)
    assert result.exit_code == 0, result.output
    for record in manifest(out):
        cam = np.load(out / record["map"])
        assert cam.dtype == np.float32 and cam.max() == 1.0 and cam.min() == 0.0


@pytest.mark.parametrize("native", [False, True])
def test_reduced_precision_on_a_cpu_without_its_units_says_it_is_emulated(image_dir, tmp_path, monkeypatch, native):
    """bf16 on a CPU without AVX512-BF16/AMX runs emulated (slower than fp32): one note says so."""
    import torch

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    out = tmp_path / "out"
    result = invoke("explain", image_dir, "-o", out, *FAST, "-q", "--precision", "bf16", "--method", "cam")
    assert result.exit_code == 0, result.output
    said = "camx: note: this CPU has no bf16 units (AVX512-BF16 or AMX): --precision bf16 is emulated here"
    assert (said in result.output) is not native
    assert len(manifest(out)) == 6  # a note, not a refusal: the run is done
    plain = invoke("explain", image_dir, "-o", tmp_path / "fp32", *FAST, "-q", "--method", "cam")
    assert "emulated" not in plain.output


def test_the_input_folder_as_output_is_refused_and_nothing_is_overwritten(tmp_path):
    folder = tmp_path / "imgs"
    write_image(folder / "x.jpg", 40, 30, 1)
    write_image(folder / "x.jpg.gradcam.jpg", 40, 30, 2)  # a user's image that looks like an output
    before = (folder / "x.jpg.gradcam.jpg").read_bytes()
    result = invoke("explain", folder, "-o", folder, *FAST)
    assert result.exit_code == 1 and "is the input folder" in result.output
    named = invoke("explain", folder / "x.jpg", folder / "x.jpg.gradcam.jpg", "-o", folder, *FAST)
    assert named.exit_code == 1 and "would overwrite the input image" in named.output
    assert (folder / "x.jpg.gradcam.jpg").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["x.jpg", "x.jpg.gradcam.jpg"]


def test_a_changed_setting_redoes_the_work_instead_of_reporting_stale_outputs(image_dir, tmp_path):
    out = tmp_path / "out"
    args = ["explain", image_dir, "-o", out, *FAST, "--json", "-q"]
    assert json.loads(invoke(*args).output)["done"] == 6
    assert json.loads(invoke(*args).output)["skipped"] == 6
    bigger = [*args[:-2], "--input-size", "96", "--json", "-q"]  # the last --input-size wins
    # another input size is another model's preprocessing: refused, then replaced on request
    refused = invoke(*bigger)
    error = json.loads(refused.output.strip().splitlines()[-1])["error"]
    assert refused.exit_code == 1 and "another model (input_size 64; this run: input_size 96)" in error
    assert {r["input_size"] for r in manifest(out)} != {96}
    assert json.loads(invoke(*bigger, "--overwrite").output)["done"] == 6
    assert {r["input_size"] for r in manifest(out)} == {96}
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"name {i}\n" for i in range(1000)))
    relabelled = invoke(*bigger, "--labels", labels)
    assert json.loads(relabelled.output)["done"] == 6
    assert all(r["class_name"] == f"name {r['class_index']}" for r in manifest(out))


def test_an_unsharded_rerun_skips_what_the_shards_did_and_lists_every_input(image_dir, tmp_path):
    out = tmp_path / "out"
    for k in (1, 2):
        assert invoke("explain", image_dir, "-o", out, *FAST, "-q", "--shard", f"{k}/2").exit_code == 0
    summary = json.loads(invoke("explain", image_dir, "-o", out, *FAST, "-q", "--json").output)
    assert summary["skipped"] == 6 and summary["done"] == 0
    assert len(manifest(out)) == 6 and {r["status"] for r in manifest(out)} == {"ok"}


def test_files_from_accepts_nul_separated_lists(image_dir, tmp_path):
    listing = tmp_path / "list0"
    listing.write_bytes(b"\0".join(str(p).encode() for p in sorted(image_dir.rglob("*.jpg"))) + b"\0")
    result = invoke("explain", "--files-from", listing, "-o", tmp_path / "out", *FAST, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["done"] == 1


def test_ctrl_c_while_starting_exits_130(image_dir, tmp_path):
    import signal
    import time

    process = subprocess.Popen(
        [camx_script(), "explain", str(image_dir), "-o", str(tmp_path / "out"), *FAST],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # importing torch, building the model
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Aborted!" not in err


def test_resume_does_not_depend_on_how_the_input_folder_was_spelled(image_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert invoke("explain", image_dir, "-o", out, *FAST, "-q").exit_code == 0
    monkeypatch.chdir(image_dir.parent)
    again = invoke("explain", f"./{image_dir.name}", "-o", out, *FAST, "-q", "--json")
    assert json.loads(again.output)["skipped"] == 6
    assert len(manifest(out)) == 6 and all(r["key"] for r in manifest(out))


def test_json_reports_a_fatal_error_as_one_object_too(tmp_path):
    (tmp_path / "empty").mkdir()
    run = subprocess.run(
        [camx_script(), "explain", str(tmp_path / "empty"), "-o", str(tmp_path / "out"), *FAST, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert json.loads(run.stdout) == {"error": run.stderr.strip().removeprefix("camx: error: "), "exit_status": 1}


def test_a_reader_that_stops_reading_is_not_an_error():
    """`camx models | head -1`: once the pipe's reader is gone, camx stops quietly with 0."""
    process = subprocess.Popen([camx_script(), "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.close()  # the reader is gone before camx writes its first line
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert err == b""
    piped = subprocess.run(f"'{camx_script()}' models | head -1", shell=True, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert piped.stdout.split() == ["model", "methods", "size", "default", "layer"] and piped.stderr == ""


def test_files_from_lines_with_trailing_spaces_name_the_files(image_dir, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{image_dir / 'a.jpg'}   \n{image_dir / 'b.png'}\t\r\n")
    result = invoke("explain", "--files-from", listing, "-o", tmp_path / "out", *FAST, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["done"] == 2
    # in a NUL-separated list names are exact: a trailing space is part of the name, and the reason says so
    nul = tmp_path / "list0"
    nul.write_bytes(f"{image_dir / 'a.jpg'} \0".encode())
    exact = invoke("explain", "--files-from", nul, "-o", tmp_path / "out0", *FAST, "-q")
    assert exact.exit_code == 3, exact.output
    assert f"the name has spaces around it ('{image_dir / 'a.jpg'} ')" in exact.output


def test_counts_agree_with_their_nouns(tmp_path):
    folder = tmp_path / "one"
    write_image(folder / "x.jpg", 40, 30, 1)
    result = invoke("explain", folder, "-o", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    assert "camx: 1 image: 1 done, 0 failed, 0 skipped" in result.output


def test_explain_help_names_every_kind_of_model_and_list():
    text = "".join(invoke("explain", "--help").output.split())  # however click wraps it
    assert "timm:NAME" in text and "hf:PATH" in text
    assert "NUL-separated" in text and "find-print0" in text
    assert "CAMX_PROGRESS_EVERY" in text
