"""Killed, resumed and failing runs: only complete files, every input recorded exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import camx_script, write_image
from PIL import Image

from cam_cli import images, rundir
from cam_cli.cli import main

COUNT = 40
ARGS = ["--device", "cpu", "--format", "png"]

SLOW_FACTORY = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import make_tiny

class Slow(type(make_tiny())):
    def forward(self, x):
        time.sleep({delay})  # a model slow enough to be caught mid-run
        return super().forward(x)

def build():
    model = Slow()
    model.load_state_dict(make_tiny().state_dict())
    return model.eval()
"""


def slow_factory(folder: Path, delay: float) -> str:
    """``--model slow_module:build``, importable from ``folder``: the tiny model plus a sleep per batch."""
    (folder / "slow_module.py").write_text(SLOW_FACTORY.format(tests=str(Path(__file__).parent), delay=delay))
    return "slow_module:build"


def make_inputs(root: Path, count: int = COUNT) -> list[str]:
    """``count`` small images of varied sizes and formats, and one empty file; returns the keys."""
    for i in range(count):
        write_image(root / f"part{i % 3}" / f"img{i:02d}.{('png', 'jpg', 'bmp')[i % 3]}", 24 + i % 7, 18 + i % 5, i)
    (root / "empty.png").write_bytes(b"")
    return [image.key for image in images.discover([root])]


def records_of(path: Path) -> list[dict]:
    """Every whole line of a manifest or journal (a torn last line is allowed, and skipped)."""
    return list(rundir.read_records(path))


def check_only_complete_files(out: Path) -> None:
    """Whatever moment a run was killed at, every visible output is whole and valid."""
    for path in out.rglob("*"):
        if path.is_dir() or path.name.startswith("."):
            continue
        if path.suffix == ".npy":
            cam = np.load(path)
            assert cam.dtype == np.float32 and cam.ndim == 2 and cam.min() >= 0 and cam.max() <= 1, path
        elif path.suffix == ".png":
            with Image.open(path) as overlay:
                overlay.load()
        else:
            assert path.name in ("manifest.jsonl",), path
    manifest = out / "manifest.jsonl"
    for record in records_of(manifest) + records_of(rundir.journal_path(manifest)):
        if record["status"] == "ok":
            assert (out / record["overlay"]).is_file() and (out / record["map"]).is_file(), record


def check_outputs_exactly_once(root: Path, out: Path, keys: list[str], failed: set[str]) -> list[dict]:
    """One line per input, valid outputs for each good one, and no other file in OUT."""
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert sorted(r["input"] for r in records) == sorted(str(root / key) for key in keys)
    expected = {"manifest.jsonl"}
    for record in records:
        key = str(Path(record["input"]).relative_to(root))
        if key in failed:
            assert record["status"] == "error" and record["overlay"] is None
            continue
        assert record["status"] == "ok", record
        assert (record["overlay"], record["map"]) == (f"{key}.gradcam.png", f"{key}.gradcam.npy")
        expected |= {record["overlay"], record["map"]}
        with Image.open(root / key) as source:
            size = source.size
        with Image.open(out / record["overlay"]) as overlay:
            assert overlay.size == size
        cam = np.load(out / record["map"])
        assert cam.dtype == np.float32 and cam.shape == (size[1], size[0]) and cam.min() >= 0 and cam.max() <= 1
    present = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert present == expected, f"stray or missing files: {present ^ expected}"
    return records


def comparable(records: list[dict]) -> set[str]:
    """Manifest lines, with scores rounded (runs may batch images differently)."""
    lines = set()
    for record in records:
        record = dict(record)
        if record["score"] is not None:
            record["score"] = round(record["score"], 4)
            record["targets"] = [{**t, "score": round(t["score"], 4)} for t in record["targets"]]
        lines.add(json.dumps(record, sort_keys=True))
    return lines


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"camx exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def kill_when(cwd: Path, args: list[str], condition: Callable[[], bool], what: str) -> None:
    """Start the installed camx, SIGKILL it the moment ``condition`` holds."""
    process = subprocess.Popen(
        [camx_script(), "explain", *args],
        cwd=cwd,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(condition, process, what)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):  # the decoding workers of a killed run go too
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigkill_at_any_point_then_resume_gives_every_output_exactly_once(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    keys = make_inputs(root)
    monkeypatch.chdir(tmp_path)
    model = slow_factory(tmp_path, delay=0.03)
    out = tmp_path / "out"
    args = [str(root), "-o", str(out), "--model", model, *ARGS, "--batch-size", "2", "--workers", "1"]
    journal = rundir.journal_path(out / "manifest.jsonl")

    def journal_lines() -> int:
        return len(records_of(journal)) if journal.exists() else 0

    # 1. very early: as soon as the run starts writing (the journal exists), maybe before any output
    kill_when(tmp_path, args, journal.exists, "the journal to appear")
    check_only_complete_files(out)
    # 2. mid-run, after some batches were recorded
    kill_when(tmp_path, args, lambda: journal_lines() >= 8, "8 journal lines")
    check_only_complete_files(out)
    first = journal_lines()
    assert 8 <= first < len(keys)
    # 3. in the middle of writing a file: a temporary is in place (or, should polling miss
    #    every one of them, once a dozen more outputs have appeared)
    folders = [out / f"part{i}" for i in range(3)]
    before = len(list(out.rglob("*.npy")))

    def writing() -> bool:
        names = [name for folder in folders if folder.is_dir() for name in os.listdir(folder)]
        return any(name.endswith(rundir.TMP_SUFFIX) for name in names) or (
            sum(name.endswith(".npy") for name in names) >= before + 12
        )

    kill_when(tmp_path, args, writing, "outputs being written")
    check_only_complete_files(out)
    assert journal_lines() >= first  # the resumed run kept what the journal held

    # 4. resume to the end: exactly the recorded, complete inputs are skipped
    recorded = rundir.load_manifest(out / "manifest.jsonl")
    complete = sum(r["status"] == "ok" for r in recorded.values())
    assert complete >= 7
    resumed = CliRunner().invoke(main, ["explain", *args, "--json"])
    assert resumed.exit_code == 3, resumed.output  # empty.png fails, every time
    summary = json.loads(resumed.stdout)
    assert summary["skipped"] == complete and summary["done"] + summary["failed"] == len(keys) - complete
    records = check_outputs_exactly_once(root, out, keys, failed={"empty.png"})
    assert not journal.exists() and not list(out.rglob("*.camx-tmp"))

    fresh = tmp_path / "fresh"
    straight = CliRunner().invoke(main, ["explain", *args[:1], "-o", str(fresh), *args[3:]])
    assert straight.exit_code == 3, straight.output
    assert comparable(records) == comparable(check_outputs_exactly_once(root, fresh, keys, failed={"empty.png"}))


def _run(root: Path, out: Path, model: str, *extra: str) -> tuple[int, dict, str]:
    result = CliRunner().invoke(
        main, ["explain", str(root), "-o", str(out), "--model", model, *ARGS, "--workers", "0", "--json", *extra]
    )
    stdout_lines = result.stdout.splitlines()
    assert len(stdout_lines) == 1, result.stdout  # exactly one JSON object on stdout, progress on stderr
    return result.exit_code, json.loads(stdout_lines[0]), result.stderr


def test_rerun_skips_what_is_complete_and_redoes_the_rest(tmp_path, tiny_factory):
    root = tmp_path / "imgs"
    keys = make_inputs(root, count=9)
    out = tmp_path / "out"
    code, summary, stderr = _run(root, out, tiny_factory)
    assert code == 3 and (summary["done"], summary["failed"], summary["skipped"]) == (9, 1, 0)
    assert set(summary) >= {"total", "done", "skipped", "failed", "seconds", "images_per_second", "out_dir", "manifest"}
    assert summary["out_dir"] == str(out) and summary["manifest"] == str(out / "manifest.jsonl")
    assert summary["images_per_second"] > 0 and "9 done, 1 failed" in stderr
    stages = summary["timings"]
    assert set(stages) >= {"start", "wait_for_data", "model", "final_writes", "finish", "postprocess_write"}
    assert 0 < stages["model"] <= summary["seconds"]
    first = comparable(check_outputs_exactly_once(root, out, keys, failed={"empty.png"}))

    # A lost overlay is redone, a fixed input is retried, and a stray temporary of a complete
    # input (what a killed --overwrite run leaves) is swept away.
    (out / "part1" / "img04.jpg.gradcam.png").unlink()
    stray = rundir.temporary_name(out / "part0" / "img00.png.gradcam.npy")
    stray.write_bytes(b"half")
    (root / "empty.png").write_bytes((root / "part0" / "img00.png").read_bytes())  # fixed meanwhile
    code, summary, _ = _run(root, out, tiny_factory)
    assert code == 0 and (summary["done"], summary["failed"], summary["skipped"]) == (2, 0, 8)
    assert not stray.exists()
    second = check_outputs_exactly_once(root, out, keys, failed=set())
    assert first - comparable(second) == {line for line in first if '"empty.png"' in line or "/empty.png" in line}

    code, summary, _ = _run(root, out, tiny_factory)
    assert code == 0 and (summary["done"], summary["skipped"]) == (0, 10)
    code, summary, _ = _run(root, out, tiny_factory, "--overwrite")
    assert code == 0 and (summary["done"], summary["skipped"]) == (10, 0)
    assert comparable(check_outputs_exactly_once(root, out, keys, failed=set())) == comparable(second)
    # another method shares OUT and the manifest, one line per input and method
    code, summary, _ = _run(root, out, tiny_factory, "--method", "cam")
    assert code == 0 and summary["done"] == 10
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted((r["input"], r["method"]) for r in lines) == sorted(
        (str(root / k), m) for k in keys for m in ("cam", "gradcam")
    )


def test_a_fatal_error_mid_run_keeps_everything_already_written(tmp_path, tiny_factory):
    root = tmp_path / "imgs"
    for name in ("a.png", "b.png", "sub/c.png", "sub/d.png", "z.png"):
        write_image(root / name, 20, 16, len(name))
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("a file where outputs for sub/ must go")  # OUT/sub is unwritable as a folder
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(root),
            "-o",
            str(out),
            "--model",
            tiny_factory,
            *ARGS,
            "--workers",
            "0",
            "--batch-size",
            "1",
            "--json",
            "-q",
        ],
    )
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["exit_status"] == 1  # --json: one error object, nothing else
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("camx: error: cannot write outputs of ")
    assert "sub/c.png" in result.stderr
    done = {r["input"]: r for r in records_of(out / "manifest.jsonl")}
    assert set(done) == {str(root / "a.png"), str(root / "b.png")}  # the batches before the failure
    assert not rundir.journal_path(out / "manifest.jsonl").exists() and not list(out.rglob("*.camx-tmp"))
    (out / "sub").unlink()
    check_only_complete_files(out)

    code, summary, _ = _run(root, out, tiny_factory)
    assert code == 0 and (summary["skipped"], summary["done"]) == (2, 3)
    check_outputs_exactly_once(root, out, ["a.png", "b.png", "sub/c.png", "sub/d.png", "z.png"], failed=set())


@pytest.mark.slow
def test_a_second_unsharded_run_into_a_busy_out_is_refused_and_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    root = tmp_path / "imgs"
    keys = make_inputs(root, count=12)
    out = tmp_path / "out"
    model = slow_factory(tmp_path, delay=1.0)  # 6 batches: the second run starts well within them
    first = subprocess.Popen(
        [camx_script(), "explain", str(root), "-o", str(out), "--model", model, *ARGS, "--method", "cam",
         "--batch-size", "2", "--workers", "0", "-q"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not records_of(rundir.journal_path(out / "manifest.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second could start"
        result = CliRunner().invoke(main, ["explain", str(root), "-o", str(out), "--model", model, *ARGS, "-q"])
        assert result.exit_code == 1
        assert result.output == (
            f"camx: error: another camx run is writing {out / 'manifest.jsonl'} right now; let it finish, "
            "or give this run another -o (or --shard K/N to split the work)\n"
        )
    finally:
        _, first_err = first.communicate(timeout=120)
    assert first.returncode == 3, first_err  # empty.png fails
    assert not list(out.glob("*.gradcam.*")) and not list(out.rglob("*.gradcam.*"))
    # once the first is done, the second runs, and the manifest holds both methods' records
    code, summary, stderr = _run(root, out, model)
    assert code == 3 and summary["done"] == len(keys) - 1, stderr
    methods = sorted((r["key"], r["method"]) for r in records_of(out / "manifest.jsonl"))
    assert methods == sorted((k, m) for k in keys for m in ("cam", "gradcam"))
