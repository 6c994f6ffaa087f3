"""SIGINT and SIGTERM: finish or drop the batch in flight, keep the manifest, exit 130/143."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import camx_script, write_image
from test_resume import check_only_complete_files, check_outputs_exactly_once, make_inputs, records_of, slow_factory

from cam_cli import rundir
from cam_cli.cli import main

pytestmark = pytest.mark.slow


def live_members(group: int) -> list[int]:
    """Processes of a process group that are still running (zombies excluded)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def wait_until(condition, process: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"camx ended ({process.returncode}) or timed out before {what}")
        time.sleep(0.005)


def start(tmp_path: Path, delay: float) -> tuple[subprocess.Popen, Path, Path, list[str], list[str]]:
    root = tmp_path / "imgs"
    keys = make_inputs(root, count=30)
    out = tmp_path / "out"
    args = [
        str(root),
        "-o",
        str(out),
        "--model",
        slow_factory(tmp_path, delay),
        "--device",
        "cpu",
        "--format",
        "png",
        "--batch-size",
        "2",
        "--workers",
        "1",
    ]
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [camx_script(), "explain", *args, "--json"],
            cwd=tmp_path,
            start_new_session=True,
            stdout=stdout,
            stderr=stderr,
        )
    journal = rundir.journal_path(out / "manifest.jsonl")
    wait_until(lambda: journal.exists() and len(records_of(journal)) >= 2, process, "two journal lines")
    return process, root, out, keys, args


def resume_and_check(tmp_path: Path, root: Path, out: Path, keys: list[str], args: list[str]) -> None:
    os.chdir(tmp_path)
    result = CliRunner().invoke(main, ["explain", *args[:-2], "--workers", "0", "--batch-size", "30", "-q"])
    assert result.exit_code == 3, result.output
    check_outputs_exactly_once(root, out, keys, failed={"empty.png"})


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_process_group_stops_cleanly(tmp_path, monkeypatch, signum, status):
    monkeypatch.chdir(tmp_path)
    process, root, out, keys, args = start(tmp_path, delay=0.1)
    os.killpg(process.pid, signum)  # what Ctrl-C in a terminal, SLURM and systemd do: the whole group
    assert process.wait(timeout=60) == status
    stderr = (tmp_path / "stderr.txt").read_text()
    name = signal.Signals(signum).name
    assert f"camx: {name} received: finishing the batch in flight" in stderr
    lines = (tmp_path / "stdout.txt").read_text().splitlines()
    assert len(lines) == 1, lines
    summary = json.loads(lines[0])
    assert summary["interrupted"] is True and 2 <= summary["done"] + summary["failed"] < len(keys)
    left = len(keys) - summary["done"] - summary["failed"]
    assert f"camx: interrupted with {left} of {len(keys)} images left; run the same command to resume" in stderr
    # The manifest holds exactly what was finished, and the workers are gone with the run.
    records = records_of(out / "manifest.jsonl")
    assert len(records) == summary["done"] + summary["failed"]
    assert not rundir.journal_path(out / "manifest.jsonl").exists() and not list(out.rglob("*.camx-tmp"))
    check_only_complete_files(out)
    assert live_members(process.pid) == []
    resume_and_check(tmp_path, root, out, keys, args)


def test_a_second_sigint_quits_at_once_and_the_journal_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    process, root, out, keys, args = start(tmp_path, delay=0.6)
    time.sleep(0.1)  # the journal just grew: the next batch is in the model for another 0.5 s
    os.killpg(process.pid, signal.SIGINT)
    wait_until(lambda: "SIGINT received" in (tmp_path / "stderr.txt").read_text(), process, "the first SIGINT")
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=60) == 130
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "camx: SIGINT received again: quitting at once" in stderr
    assert "images left" not in stderr and (tmp_path / "stdout.txt").read_text() == ""  # the batch was dropped
    journal = rundir.journal_path(out / "manifest.jsonl")
    assert len(records_of(journal)) >= 2 and not (out / "manifest.jsonl").exists()
    check_only_complete_files(out)
    deadline = time.monotonic() + 2  # a worker left to itself would linger for 5 s
    while live_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_members(process.pid) == []  # no decoding worker left behind
    resume_and_check(tmp_path, root, out, keys, args)
    assert not journal.exists()


def test_a_first_signal_after_a_complete_run_leaves_its_exit_status(image_dir, tiny_factory, tmp_path):
    import threading

    from cam_cli.cli import signals as cli

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = threading.Event()
    try:
        with cli.graceful_stop(stop, lambda name: None):
            pass  # the run finished without a signal
        assert signal.getsignal(signal.SIGINT) is cli._after_the_run
        os.kill(os.getpid(), signal.SIGINT)  # while the finished run reports: no KeyboardInterrupt, no 130
        time.sleep(0.05)
        assert not stop.is_set() and signal.getsignal(signal.SIGTERM) is cli._exit_at_once  # a second quits
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    # `camx explain` in this process hands back the handlers it found
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(image_dir),
            "-o",
            str(tmp_path / "out"),
            "--model",
            tiny_factory,
            "--workers",
            "0",
            "-q",
            "--input-size",
            "32",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert {s: signal.getsignal(s) for s in saved} == saved


def test_sigterm_to_the_main_process_alone_stops_after_the_batches_in_flight(tmp_path, monkeypatch):
    """As `timeout -s TERM` sends it: to camx only, not to its decoding workers."""
    monkeypatch.chdir(tmp_path)
    process, root, out, keys, args = start(tmp_path, delay=0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    summary = json.loads((tmp_path / "stdout.txt").read_text().splitlines()[0])
    assert summary["interrupted"] is True
    done = summary["done"] + summary["failed"]
    assert done < len(keys), "the run went on to the end after SIGTERM"
    left = len(keys) - done
    stderr = (tmp_path / "stderr.txt").read_text()
    assert f"camx: interrupted with {left} of {len(keys)} images left" in stderr and left > 0
    assert len(records_of(out / "manifest.jsonl")) == done
    assert live_members(process.pid) == []
    resume_and_check(tmp_path, root, out, keys, args)


def test_a_first_sigint_during_scorecam_keeps_the_images_already_finished(tmp_path, monkeypatch):
    """One batch of six images, one image's six masked passes a chunk: Ctrl-C after the second
    image keeps the images whose maps are finished, and a resume does only the rest."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "imgs"
    for i in range(6):
        write_image(root / f"img{i}.png", 30, 20, i)
    out = tmp_path / "out"
    args = [str(root), "-o", str(out), "--model", slow_factory(tmp_path, 0.3), "--method", "scorecam", "--device",
            "cpu", "--format", "png", "--batch-size", "6", "--workers", "0", "--input-size", "32"]  # fmt: skip
    stderr_path = tmp_path / "stderr.txt"
    env = {**os.environ, "CAMX_PROGRESS_EVERY": "0"}
    with open(tmp_path / "stdout.txt", "w") as stdout, open(stderr_path, "w") as stderr:
        process = subprocess.Popen([camx_script(), "explain", *args, "--json"], cwd=tmp_path, env=env,
                                   start_new_session=True, stdout=stdout, stderr=stderr)  # fmt: skip

    def passes() -> int:  # the progress lines count the masked passes against their total
        return max((int(n) for n in re.findall(r"(\d+)/36 forward passes", stderr_path.read_text())), default=0)

    wait_until(lambda: passes() >= 12, process, "two images' passes")
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=60) == 130
    log = stderr_path.read_text()
    assert "camx: SIGINT received: stopping after the current pass; the images of the batch whose maps are " \
        "finished are kept" in log  # fmt: skip
    assert " left, " in log  # a time-left estimate from the passes' rate
    summary = json.loads((tmp_path / "stdout.txt").read_text().splitlines()[0])
    kept = summary["done"]
    assert summary["interrupted"] is True and 2 <= kept < 6, summary
    records = records_of(out / "manifest.jsonl")
    assert sorted(r["key"] for r in records) == [f"img{i}.png" for i in range(kept)]
    for record in records:
        assert record["status"] == "ok" and (out / record["overlay"]).is_file() and (out / record["map"]).is_file()
    check_only_complete_files(out)
    maps = {r["key"]: np.load(out / r["map"]) for r in records}

    resumed = CliRunner().invoke(main, ["explain", *args, "--json", "-q"])
    assert resumed.exit_code == 0, resumed.output
    again = json.loads(resumed.stdout)
    assert (again["done"], again["skipped"]) == (6 - kept, kept)
    whole = CliRunner().invoke(main, ["explain", args[0], "-o", str(tmp_path / "whole"), *args[3:], "-q"])
    assert whole.exit_code == 0, whole.output
    for key, cam in maps.items():  # the kept maps are those of a run that was not stopped
        np.testing.assert_allclose(cam, np.load(tmp_path / "whole" / f"{key}.scorecam.npy"), atol=1e-6)
