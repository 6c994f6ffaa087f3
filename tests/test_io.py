"""cam_cli.images and cam_cli.rundir: discovery, keys, atomic writes, the journal and manifest, what root cannot see."""

from __future__ import annotations

import io
import json
import os
import pickle
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image

from cam_cli import images, rundir
from cam_cli.errors import DecodeError, InputError, OutputError, WeightsError
from cam_cli.models import load_state_dict


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_folders_are_walked_sorted_recursively_skipping_hidden_and_other_files(tmp_path):
    root = tmp_path / "imgs"
    for name in ["b.JPG", "a.png", "z/c.jpeg", "m/d.TIFF", "m/.e.png", ".dot/f.png", "g.txt", "h.jpg.bak", "i.WebP"]:
        write_image(root / name, 8, 8) if not name.endswith((".txt", ".bak")) else (root / name).write_text("x")
    found = images.discover([root])
    assert [image.key for image in found] == ["a.png", "b.JPG", "i.WebP", "m/d.TIFF", "z/c.jpeg"]
    assert all(image.path == root / image.key for image in found)
    # the output folder inside the input folder is never read back as input
    write_image(root / "out" / "a.png.gradcam.jpg", 8, 8)
    assert "out/a.png.gradcam.jpg" not in [i.key for i in images.discover([root], exclude=root / "out")]


def test_keys_never_leave_out(tmp_path):
    assert images.key_for_listed_path(Path("a/./b.jpg")) == "a/b.jpg"
    assert images.key_for_listed_path(Path("/data/x.jpg")) == "data/x.jpg"
    climbing = images.key_for_listed_path(Path("../../x.jpg"))
    assert climbing == str(Path(os.path.abspath("../../x.jpg"))).lstrip("/")
    for key in (climbing, images.key_for_listed_path(Path("//etc/../etc/passwd.png"))):
        assert not key.startswith("/") and ".." not in Path(key).parts


def test_one_file_named_several_ways_is_one_input(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    write_image(root / "a.png", 8, 8)
    write_image(root / "b.png", 8, 8)
    monkeypatch.chdir(tmp_path)
    listed = [Path("imgs/a.png"), Path("./imgs/a.png"), root / "a.png", Path("imgs/../imgs/b.png"), Path("imgs/b.png")]
    found = images.discover([root], listed)
    # the folder found them first, so they keep its keys; nothing is explained twice
    assert [(image.key, image.path) for image in found] == [("a.png", root / "a.png"), ("b.png", root / "b.png")]
    only_listed = images.discover([], listed)
    assert [image.key for image in only_listed] == ["imgs/a.png", str(root / "b.png").lstrip("/")]


def test_two_inputs_with_the_same_outputs_are_refused_before_anything_runs(tmp_path):
    write_image(tmp_path / "one" / "same.png", 8, 8)
    write_image(tmp_path / "two" / "same.png", 8, 8)
    with pytest.raises(InputError, match="would write the same outputs"):
        images.discover([tmp_path / "one" / "same.png", tmp_path / "two" / "same.png"])


def test_write_atomic_replaces_whole_files_and_cleans_up_after_a_failure(tmp_path):
    target = tmp_path / "sub" / "map.npy"
    rundir.write_atomic(target, npy_bytes(np.ones((2, 3), np.float32)))
    rundir.write_atomic(target, npy_bytes(np.zeros((4, 5), np.float32)))
    assert np.load(target).shape == (4, 5)
    assert sorted(p.name for p in target.parent.iterdir()) == ["map.npy"]
    # A folder where the temporary should go: the write fails, the old file stays, nothing is left behind.
    rundir.temporary_name(target).mkdir()
    with pytest.raises(OSError):
        rundir.write_atomic(target, b"new")
    assert np.load(target).shape == (4, 5)
    # A temporary left by a killed run is removed by the sweep (and only ours).
    rundir.temporary_name(target).rmdir()
    rundir.temporary_name(target).write_bytes(b"half a file")
    (tmp_path / "sub" / ".someone-else.camx-tmp").write_bytes(b"not ours")
    assert rundir.remove_temporaries([target]) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == [".someone-else.camx-tmp", "map.npy"]


def _record(name: str, **extra: object) -> dict:
    return {"input": name, "method": "gradcam", "status": "ok", **extra}


def test_a_torn_journal_line_is_skipped_and_never_swallows_the_next_record(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    rundir.write_manifest(manifest, {rundir.record_key(r): r for r in [_record("a"), _record("b")]})
    # a killed run: one whole record and one cut off mid-line
    rundir.journal_path(manifest).write_text(json.dumps(_record("c")) + "\n" + json.dumps(_record("d"))[:17])
    journal = rundir.Journal(manifest)
    journal.append([_record("e"), _record("b", status="error")])
    journal.close()
    assert sorted(k[0] for k in rundir.load_manifest(manifest)) == ["a", "b", "c", "e"]
    assert rundir.finalise_manifest(manifest, {rundir.record_key(r): r for r in [_record("d")]}) == 5
    lines = manifest.read_text().splitlines()
    assert [json.loads(line)["input"] for line in lines] == ["a", "b", "c", "d", "e"]
    assert json.loads(lines[1])["status"] == "error"  # the later record wins
    assert not rundir.journal_path(manifest).exists()
    assert not rundir.temporary_name(manifest).exists()


def test_records_survive_odd_characters(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    names = ["line\u2028separator.png", "new\nline.png", "ünï 画像.png"]
    rundir.write_manifest(manifest, {rundir.record_key(r): r for r in map(_record, names)})
    assert sorted(k[0] for k in rundir.load_manifest(manifest)) == sorted(names)
    assert len(manifest.read_bytes().split(b"\n")) == len(names) + 1


def test_merge_joins_parts_and_their_journals_keeping_unrelated_lines(tmp_path):
    parts = [tmp_path / "manifest.shard-1-of-2.jsonl", tmp_path / "manifest.shard-2-of-2.jsonl"]
    rundir.write_manifest(parts[0], {rundir.record_key(r): r for r in [_record("a"), _record("c")]})
    rundir.journal_path(parts[1]).write_text(json.dumps(_record("b")) + "\n")  # shard 2 was killed
    rundir.write_manifest(tmp_path / "manifest.jsonl", {rundir.record_key(r): r for r in [_record("old")]})
    assert rundir.merge_manifests(tmp_path, parts, tmp_path / "manifest.jsonl") == 4
    inputs = [json.loads(line)["input"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert inputs == ["a", "b", "c", "old"]
    with pytest.raises(InputError, match="no manifest parts"):
        rundir.merge_manifests(tmp_path, [], tmp_path / "manifest.jsonl")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_under_the_journal_is_an_output_error(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    os.symlink("/dev/full", rundir.journal_path(manifest))  # every write: ENOSPC
    journal = rundir.Journal(manifest)
    with pytest.raises(OutputError, match=r"cannot write .*\.manifest\.jsonl\.journal: No space left on device"):
        journal.append([_record("a")])
    journal.close()


def _as_nobody(function, *args: object) -> str:
    """Run ``function(*args)`` in a forked child with uid/gid nobody; returns its outcome as text.

    We run the tests as root, who reads every file whatever its mode, so the
    permission checks need a process without root's privileges.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                outcome = f"returned {function(*args)!r}"
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            os.write(write, outcome.encode())
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0, reason="needs root to switch to nobody")
def test_unreadable_files_and_folders_become_reasons_not_crashes():
    # pytest's tmp_path is private to root; nobody needs a path it can traverse.
    with tempfile.TemporaryDirectory(prefix="camx-perm-") as base:
        root = Path(base)
        root.chmod(0o755)
        write_image(root / "ok.png", 10, 8, 1)
        write_image(root / "locked.png", 10, 8, 2).chmod(0)
        write_image(root / "closed" / "inside.png", 10, 8, 3)
        (root / "closed").chmod(0)

        def walk_and_decode() -> list[tuple[str, str]]:
            outcome = []
            for image in images.discover([root]):
                try:
                    outcome.append((image.key, str(images.decode_image(image.path).shape)))
                except DecodeError as exc:
                    outcome.append((image.key, str(exc)))
            return outcome

        seen = _as_nobody(walk_and_decode)
        assert seen == "returned " + repr(
            [("closed", "permission denied"), ("locked.png", "permission denied"), ("ok.png", "(8, 10, 3)")]
        )
        (root / "closed").chmod(0o755)
        root.chmod(0)
        assert _as_nobody(images.discover, [root]).startswith("InputError: cannot read folder")
        root.chmod(0o700)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_bare_pickle_that_would_run_code_is_refused(tmp_path):
    # test_loading.py covers a torch.save'd payload through the CLI; this is a plain pickle.dump.
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"fc.weight": Exploit()}, handle)
    with pytest.raises(WeightsError, match="evil.pth"):
        load_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_file_modes_of_outputs_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        rundir.write_atomic(tmp_path / "x.jpg", b"data")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "x.jpg").stat().st_mode) == 0o644


def test_files_that_are_not_checkpoints_get_a_short_reason(tmp_path):
    torch = pytest.importorskip("torch")
    whole = tmp_path / "whole.pth"
    torch.save({"w": torch.zeros(1000, 100)}, whole)
    cases = {
        "junk.pth": (b"hello world", "not a PyTorch checkpoint"),
        "empty.pth": (b"", "empty file (0 bytes)"),
        "cut.pth": (whole.read_bytes()[:100_000], "not a complete PyTorch checkpoint (truncated or damaged)"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError) as caught:
            load_state_dict(tmp_path / name)
        assert str(caught.value) == f"cannot read weights {tmp_path / name}: {reason}"


def test_write_npy_writes_the_array_as_it_is_and_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "m" / "a.jpg.gradcam.npy"
    rng = np.random.default_rng(0)
    first = rng.random((37, 53), dtype=np.float32)
    rundir.write_npy(target, first)
    loaded = np.load(target)
    assert loaded.dtype == np.float32 and np.array_equal(loaded, first)
    assert target.read_bytes() == npy_bytes(first)  # the same file as np.save makes

    def half_then_fail(handle):
        handle.write(b"\x93NUMPY half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        rundir.write_atomic(target, half_then_fail)
    assert np.array_equal(np.load(target), first)
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.jpg.gradcam.npy"]
