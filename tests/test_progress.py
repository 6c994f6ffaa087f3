"""Progress on stderr: a bar on a terminal only; in a log, plain lines with the count, the
total, the rate and the time left, each failure on a line of its own, nothing before the
run starts writing."""

from __future__ import annotations

import io
import os
import re
import subprocess
from pathlib import Path

from click.testing import CliRunner
from conftest import camx_script, write_image
from test_resume import slow_factory

from cam_cli import rundir
from cam_cli.cli import main
from cam_cli.cli.progress import Progress, duration

LINE = re.compile(r"^camx gradcam: (\d+)/7 img, ")


def run_logged(tmp_path: Path, *args: str, every: str = "0.01") -> tuple[int, str, str]:
    """The installed camx, as cron runs it: stdin from /dev/null, stdout and stderr to files."""
    env = {**os.environ, "CAMX_PROGRESS_EVERY": every}
    with (
        open(os.devnull) as stdin,
        open(tmp_path / "stdout.log", "w") as stdout,
        open(tmp_path / "stderr.log", "w") as stderr,
    ):
        code = subprocess.run(
            [camx_script(), *args], stdin=stdin, stdout=stdout, stderr=stderr, cwd=tmp_path, env=env, timeout=300
        ).returncode
    return code, (tmp_path / "stdout.log").read_text(), (tmp_path / "stderr.log").read_text()


def folder_with_a_broken_file(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    for i in range(6):
        write_image(root / f"img{i}.png", 30, 20, i)
    (root / "broken.jpg").write_text("just some text with an image's extension\n")
    return root


def test_explain_into_a_log_writes_plain_lines_and_each_failure_on_its_own(tmp_path):
    root = folder_with_a_broken_file(tmp_path)
    model = slow_factory(tmp_path, delay=0.05)
    args = ["--model", model, "--device", "cpu", "--batch-size", "2", "--workers", "0", "--input-size", "32"]
    code, _, log = run_logged(tmp_path, "explain", str(root), "-o", str(tmp_path / "out"), *args)
    assert code == 3, log
    assert "\r" not in log, "a bar's frames in a log file"
    lines = log.splitlines()
    assert f"camx: failed: {root / 'broken.jpg'}: not a recognised image file" in lines, log
    progress = [line for line in lines if LINE.match(line)]
    assert len(progress) >= 2, log  # the first once writing starts, the last at the end
    assert progress[-1].startswith("camx gradcam: 7/7 img, ") and "img/s" in progress[-1], progress
    assert any(" left, " in line for line in progress), progress  # batches take longer than 0.01 s
    counts = [int(LINE.match(line).group(1)) for line in progress]  # type: ignore[union-attr]
    assert counts == sorted(counts)
    assert "camx: 7 images: 6 done, 1 failed" in log


def test_evaluate_into_a_log_writes_plain_lines_and_each_failure_on_its_own(tmp_path, tiny_factory):
    root = folder_with_a_broken_file(tmp_path)
    out = tmp_path / "out"
    made = CliRunner().invoke(main, ["explain", str(root), "-o", str(out), "--model", tiny_factory, "--device", "cpu",
                                     "--workers", "0", "--input-size", "32", "-q"])  # fmt: skip
    assert made.exit_code == 3, made.output
    (out / "img3.png.gradcam.npy").unlink()  # this line cannot be evaluated
    code, _, log = run_logged(tmp_path, "evaluate", str(out), "--device", "cpu", "--workers", "0", "--steps", "4")
    assert code == 3, log
    assert "\r" not in log
    lines = log.splitlines()
    assert any(line.startswith("camx: failed: img3.png (gradcam): ") for line in lines), log
    progress = [line for line in lines if line.startswith("camx evaluate: ")]
    assert progress and progress[-1].startswith("camx evaluate: 6/6 pair, "), log


def test_nothing_is_shown_as_progress_before_a_fatal_error_while_opening_the_outputs(tmp_path, tiny_factory):
    images = tmp_path / "imgs"
    write_image(images / "a.png", 30, 20, 1)
    out = tmp_path / "out"
    out.mkdir()
    holder = rundir.Journal(out / "manifest.jsonl")  # another run writing into OUT right now
    try:
        result = CliRunner().invoke(main, ["explain", str(images), "-o", str(out), "--model", tiny_factory,
                                           "--device", "cpu", "--workers", "0", "--input-size", "32"])  # fmt: skip
    finally:
        holder.close()
    assert result.exit_code == 1, result.output
    assert result.output.startswith("camx: error: another camx run is writing") and result.output.count("\n") == 1


def test_a_line_gives_count_total_rate_passes_and_time_left():
    stream = io.StringIO()
    shown = Progress("camx scorecam", 4, "img", passes_total=80, stream=stream)
    shown.start()
    shown.started -= 10.0  # type: ignore[operator]  # ten seconds ago
    shown.add_passes(20)
    shown.update(1)
    line = shown.line()
    # 20 of 80 passes in 10 s: 60 more take 30 s
    assert line.startswith("camx scorecam: 1/4 img, 0.10 img/s, 20/80 forward passes (2.0/s), 0:30 left, 0:10 elapsed")
    shown.close()
    assert "\r" not in stream.getvalue() and stream.getvalue().splitlines()[0] == "camx scorecam: 0/4 img, " + (
        "0/80 forward passes, 0:00 elapsed"
    )
    assert (duration(59.4), duration(61), duration(3725)) == ("0:59", "1:01", "1:02:05")


def test_a_quiet_run_shows_nothing(tmp_path):
    stream = io.StringIO()
    with Progress("camx gradcam", 2, "img", quiet=True, stream=stream) as shown:
        shown.start()
        shown.update(2)
    assert stream.getvalue() == "" and shown.done == 2


def test_on_a_terminal_the_bar_stays(tmp_path, tiny_factory):
    import fcntl
    import pty
    import struct
    import termios

    images = tmp_path / "imgs"
    for i in range(3):
        write_image(images / f"img{i}.png", 30, 20, i)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    try:
        done = subprocess.run([camx_script(), "explain", str(images), "-o", str(tmp_path / "out"), "--model",
                               tiny_factory, "--device", "cpu", "--workers", "0", "--input-size", "32"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower, cwd=tmp_path,
                              timeout=300)  # fmt: skip
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
    assert done.returncode == 0, seen
    text = seen.decode()
    assert "\r" in text and "3/3" in text and "img/s" in text  # tqdm's frames
    assert not any(LINE.match(line) for line in text.splitlines())


def test_evaluate_shows_nothing_before_a_fatal_error_while_opening_its_outputs(tmp_path, tiny_factory):
    images = tmp_path / "imgs"
    write_image(images / "a.png", 30, 20, 1)
    out = tmp_path / "out"
    made = CliRunner().invoke(main, ["explain", str(images), "-o", str(out), "--model", tiny_factory, "--device",
                                     "cpu", "--workers", "0", "--input-size", "32", "-q"])  # fmt: skip
    assert made.exit_code == 0, made.output
    holder = rundir.Journal(out / "metrics.jsonl")  # another evaluate writing into OUT right now
    try:
        result = CliRunner().invoke(main, ["evaluate", str(out), "--device", "cpu", "--workers", "0"])
    finally:
        holder.close()
    assert result.exit_code == 1, result.output
    assert result.output.startswith("camx: error: another camx evaluate is writing") and result.output.count("\n") == 1
