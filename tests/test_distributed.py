"""Shards (--shard K/N, `camx merge`) and torchrun: together the same outputs as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import camx_script, write_image
from test_resume import check_outputs_exactly_once, comparable

from cam_cli import images, rundir
from cam_cli.cli import main

ARGS = ["--device", "cpu", "--format", "png", "--batch-size", "3", "--workers", "0"]


def make_images(root: Path, count: int = 14) -> list[str]:
    for i in range(count):
        write_image(root / ("sub" if i % 4 == 0 else ".") / f"im{i:02d}.{('png', 'jpg')[i % 2]}", 20 + i, 16 + i % 3, i)
    return [image.key for image in images.discover([root])]


def single_run(root: Path, out: Path, model: str, keys: list[str]) -> set[str]:
    result = CliRunner().invoke(main, ["explain", str(root), "-o", str(out), "--model", model, *ARGS, "-q"])
    assert result.exit_code == 0, result.output
    return comparable(check_outputs_exactly_once(root, out, keys, failed=set()))


def test_shards_are_disjoint_deterministic_and_cover_everything(tmp_path):
    root = tmp_path / "imgs"
    keys = make_images(root, count=23)
    for n in range(1, 7):
        shards = [[image.key for image in images.select_shard(images.discover([root]), k, n)] for k in range(1, n + 1)]
        assert sorted(key for shard in shards for key in shard) == sorted(keys)  # each key exactly once
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        again = [[image.key for image in images.select_shard(images.discover([root]), k, n)] for k in range(1, n + 1)]
        assert shards == again


@pytest.mark.slow
def test_shards_running_at_once_into_one_out_merge_into_the_single_run_manifest(tmp_path, tiny_factory):
    root = tmp_path / "imgs"
    keys = make_images(root)
    expected = single_run(root, tmp_path / "single", tiny_factory, keys)
    out = tmp_path / "out"
    shards = [
        subprocess.Popen(
            [
                camx_script(),
                "explain",
                str(root),
                "-o",
                str(out),
                "--model",
                tiny_factory,
                *ARGS,
                "-q",
                "--shard",
                f"{k}/2",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in (1, 2)
    ]
    for k, shard in enumerate(shards, start=1):
        stdout, stderr = shard.communicate(timeout=180)
        assert shard.returncode == 0, stderr
        part = [r["input"] for r in rundir.read_records(out / f"manifest.shard-{k}-of-2.jsonl")]
        assert part == [str(root / image.key) for image in images.select_shard(images.discover([root]), k, 2)]
    assert not (out / "manifest.jsonl").exists()

    merged = CliRunner().invoke(main, ["merge", str(out)])
    assert merged.exit_code == 0, merged.output
    assert f"merged 2 parts into {out / 'manifest.jsonl'} ({len(keys)} lines)" in merged.stderr
    # the parts stay (a re-run of a shard resumes from them); the rest is the single run's
    parts = {"manifest.shard-1-of-2.jsonl", "manifest.shard-2-of-2.jsonl"}
    assert {p.name for p in out.iterdir() if p.name.startswith("manifest")} == parts | {"manifest.jsonl"}
    for part in parts:
        (out / part).unlink()
    assert comparable(check_outputs_exactly_once(root, out, keys, failed=set())) == expected


def test_merge_without_parts_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["merge", str(tmp_path)])
    assert result.exit_code == 1 and result.output.startswith("camx: error: no manifest parts")
    assert result.output.count("\n") == 1


def test_merge_names_missing_shards_and_takes_a_killed_shards_journal(tmp_path):
    def line(key: str) -> str:
        return json.dumps({"input": f"/in/{key}", "key": key, "method": "cam", "status": "ok"}) + "\n"

    (tmp_path / "manifest.shard-1-of-3.jsonl").write_text(line("a.png"))
    (tmp_path / ".manifest.shard-3-of-3.jsonl.journal").write_text(line("c.png") + '{"input": "/in/torn')
    result = CliRunner().invoke(main, ["merge", str(tmp_path)])
    assert result.exit_code == 3, result.output
    assert f"merged 2 parts into {tmp_path / 'manifest.jsonl'} (2 lines)" in result.stderr
    assert "warning: no manifest part of shard 2/3" in result.stderr
    assert [r["key"] for r in rundir.read_records(tmp_path / "manifest.jsonl")] == ["a.png", "c.png"]

    (tmp_path / "manifest.shard-2-of-3.jsonl").write_text(line("b.png"))
    complete = CliRunner().invoke(main, ["merge", str(tmp_path)])
    assert complete.exit_code == 0 and "warning" not in complete.stderr, complete.output
    assert [r["key"] for r in rundir.read_records(tmp_path / "manifest.jsonl")] == ["a.png", "b.png", "c.png"]

    (tmp_path / "manifest.shard-1-of-2.jsonl").write_text(line("a.png"))
    mixed = CliRunner().invoke(main, ["merge", str(tmp_path)])
    assert mixed.exit_code == 3
    assert "parts of 2 different shardings (--shard K/2, --shard K/3)" in mixed.stderr
    assert "no manifest part of shard 2/2" in mixed.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_single_process_outputs(tmp_path, tiny_factory):
    root = tmp_path / "imgs"
    keys = make_images(root)
    expected = single_run(root, tmp_path / "single", tiny_factory, keys)
    out = tmp_path / "out"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "cam_cli",
            "explain",
            str(root),
            "-o",
            str(out),
            "--model",
            tiny_factory,
            *ARGS,
            "--json",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 1, run.stdout  # rank 0 speaks for the whole run
    summary = json.loads(lines[0])
    assert (summary["total"], summary["done"], summary["failed"]) == (len(keys), len(keys), 0)
    assert summary["manifest"] == str(out / "manifest.jsonl")
    for k in (1, 2):  # each rank took its shard
        part = [r["input"] for r in rundir.read_records(out / f"manifest.shard-{k}-of-2.jsonl")]
        assert part == [str(root / image.key) for image in images.select_shard(images.discover([root]), k, 2)]
        (out / f"manifest.shard-{k}-of-2.jsonl").unlink()
    assert comparable(check_outputs_exactly_once(root, out, keys, failed=set())) == expected


def test_merge_of_one_part_says_part_and_line(tmp_path):
    line = json.dumps({"input": "/in/a.png", "key": "a.png", "method": "cam", "status": "ok"}) + "\n"
    (tmp_path / "manifest.shard-1-of-1.jsonl").write_text(line)
    result = CliRunner().invoke(main, ["merge", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"camx: merged 1 part into {tmp_path / 'manifest.jsonl'} (1 line)" in result.stderr
