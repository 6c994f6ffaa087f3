"""Inputs as batch jobs meet them: a generated corpus of awkward files, lists of paths, and OUT's boundary."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_image
from PIL import Image

from cam_cli import images
from cam_cli.cli import main
from cam_cli.errors import DecodeError

TINY = ["--device", "cpu", "--batch-size", "4", "--format", "png"]


def _noise(height: int, width: int, channels: int | None = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _encoded(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, fmt)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


#: name -> (expected status, (width, height) as a viewer shows it, or a fragment of the error)
EXPECTED: dict[str, tuple[str, object]] = {
    "empty.jpg": ("error", "empty file (0 bytes)"),
    "truncated.jpg": ("error", "truncated"),
    "truncated.png": ("error", "cannot decode"),
    "text.jpg": ("error", "not a recognised image file"),
    "bomb.png": ("error", "more than --max-pixels"),
    "big.png": ("error", "more than --max-pixels 10000"),
    "broken link.jpg": ("error", "file not found"),
    "pipe.jpg": ("error", "not a regular file"),
    "animated.gif": ("ok", (30, 20)),
    "deep16.png": ("ok", (35, 25)),
    "cmyk.jpg": ("ok", (40, 30)),
    "grey.png": ("ok", (40, 30)),
    "grey_alpha.png": ("ok", (40, 30)),
    "palette.gif": ("ok", (40, 30)),
    "rgba.png": ("ok", (40, 30)),
    "rotated.jpg": ("ok", (30, 50)),  # stored 50 wide, 30 high; EXIF orientation 6
    "one.png": ("ok", (1, 1)),
    "one.jpg": ("ok", (1, 1)),
    "spaces in name.JPG": ("ok", (33, 21)),
    "ünïcødé 画像.png": ("ok", (23, 31)),
    "UPPER.PNG": ("ok", (20, 24)),
    "sub/deeper/n.webp": ("ok", (26, 18)),
    "linked/far.bmp": ("ok", (19, 27)),  # through a symlinked folder
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder of the inputs that batch jobs meet, made on the spot (no binary blobs)."""
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "empty.jpg").write_bytes(b"")
    jpeg = _encoded(_noise(64, 64), "JPEG")
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png = _encoded(_noise(64, 64), "PNG")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "text.jpg").write_text("just some text with an image's extension\n")
    (root / "bomb.png").write_bytes(_png_claiming(20000, 20000))
    (root / "big.png").write_bytes(_encoded(_noise(100, 120), "PNG"))  # 12000 pixels
    os.symlink(root / "gone.jpg", root / "broken link.jpg")
    os.mkfifo(root / "pipe.jpg")
    # first frame black, then white: the overlay shows which was used
    frames = [Image.new("RGB", (30, 20), colour) for colour in ((0, 0, 0), (255, 255, 255), (255, 255, 255))]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=40, loop=0)
    ramp = np.linspace(0, 65535, 25 * 35).reshape(25, 35).astype(np.uint16)
    Image.fromarray(ramp).save(root / "deep16.png")
    Image.fromarray(_noise(30, 40)).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(_noise(30, 40, None), "L").save(root / "grey.png")
    Image.fromarray(_noise(30, 40, 2), "LA").save(root / "grey_alpha.png")
    Image.fromarray(_noise(30, 40)).convert("P").save(root / "palette.gif")
    Image.fromarray(_noise(30, 40, 4), "RGBA").save(root / "rgba.png")
    stored = Image.fromarray(_noise(30, 50))
    exif = stored.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    stored.save(root / "rotated.jpg", exif=exif)
    Image.fromarray(_noise(1, 1)).save(root / "one.png")
    Image.fromarray(_noise(1, 1)).save(root / "one.jpg")
    write_image(root / "spaces in name.JPG", 33, 21, 7)
    write_image(root / "ünïcødé 画像.png", 23, 31, 8)
    write_image(root / "UPPER.PNG", 20, 24, 10)
    write_image(root / "sub" / "deeper" / "n.webp", 26, 18, 11)
    # skipped: hidden files and folders, other extensions
    write_image(root / ".hidden.jpg", 20, 20, 12)
    write_image(root / ".cache" / "x.jpg", 20, 20, 13)
    (root / "notes.txt").write_text("not an image")
    (root / "model.pth").write_bytes(b"\0" * 8)
    # a symlinked folder outside the corpus is followed; a link back to the corpus is not
    write_image(tmp_path / "elsewhere" / "far.bmp", 19, 27, 14)
    os.symlink(tmp_path / "elsewhere", root / "linked")
    os.symlink(root, root / "sub" / "loop")
    return root


def _records(out: Path) -> dict[str, dict]:
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len({r["input"] for r in records}), "an input has two manifest lines"
    return {r["input"]: r for r in records}


def _check_ok_outputs(out: Path, record: dict, size: tuple[int, int]) -> None:
    assert (record["width"], record["height"]) == size
    overlay = Image.open(out / record["overlay"])
    overlay.load()
    assert overlay.size == size and overlay.mode == "RGB"
    cam = np.load(out / record["map"])
    assert cam.dtype == np.float32 and cam.shape == (size[1], size[0])
    assert cam.min() >= 0.0 and cam.max() <= 1.0


def test_every_awkward_input_is_explained_or_reported_in_one_line(corpus, tmp_path, tiny_factory):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(corpus),
            "-o",
            str(out),
            "--model",
            tiny_factory,
            *TINY,
            "--workers",
            "1",
            "--max-pixels",
            "10000",
            "--json",
        ],
    )
    assert result.exit_code == 3, result.output
    records = _records(out)
    by_name = {str(Path(path).relative_to(corpus)): record for path, record in records.items()}
    assert set(by_name) == set(EXPECTED), "hidden files, other extensions or the link loop leaked in"
    for name, (status, detail) in EXPECTED.items():
        record = by_name[name]
        assert record["status"] == status, (name, record["error"])
        if status == "ok":
            _check_ok_outputs(out, record, detail)  # type: ignore[arg-type]
        else:
            assert detail in record["error"] and "\n" not in record["error"], (name, record["error"])
            assert record["overlay"] is None and record["map"] is None
            assert f"{corpus / name}: {record['error']}" in result.stderr
    summary = json.loads(result.stdout)
    failed = sum(status == "error" for status, _ in EXPECTED.values())
    assert (summary["failed"], summary["done"], summary["total"]) == (failed, len(EXPECTED) - failed, len(EXPECTED))
    # The animation's first (black) frame was explained: alpha * heat never reaches 0.4 * 255 + 1.
    assert np.asarray(Image.open(out / by_name["animated.gif"]["overlay"])).max() <= 103
    # Outputs keep the input names, spaces and all; the folder link's outputs are real files inside OUT.
    assert (out / "ünïcødé 画像.png.gradcam.png").is_file() and (out / "spaces in name.JPG.gradcam.npy").is_file()
    assert (out / "linked" / "far.bmp.gradcam.png").is_file() and not (out / "linked").is_symlink()

    # Raising --max-pixels retries only the failures; the 12000-pixel image now works, the bomb still fails.
    again = CliRunner().invoke(
        main,
        [
            "explain",
            str(corpus),
            "-o",
            str(out),
            "--model",
            tiny_factory,
            *TINY,
            "--workers",
            "0",
            "--max-pixels",
            "20000",
            "--json",
        ],
    )
    assert again.exit_code == 3, again.output
    summary = json.loads(again.stdout)
    assert summary["skipped"] == len(EXPECTED) - failed and summary["done"] == 1
    records = _records(out)
    _check_ok_outputs(out, records[str(corpus / "big.png")], (120, 100))
    assert "more than --max-pixels 20000" in records[str(corpus / "bomb.png")]["error"]


def test_decoding_matches_what_a_viewer_shows(corpus):
    rotated = images.decode_image(corpus / "rotated.jpg")
    assert rotated.shape == (50, 30, 3)  # EXIF orientation applied
    deep = images.decode_image(corpus / "deep16.png")
    assert deep.shape == (25, 35, 3) and deep[0, 0].tolist() == [0, 0, 0] and deep[-1, -1].tolist() == [255] * 3
    assert np.all(deep[..., 0] == deep[..., 2])  # grey stays grey
    transparent = Image.new("RGBA", (4, 3), (10, 20, 30, 0))
    transparent.save(corpus / "clear.png")
    assert images.decode_image(corpus / "clear.png").tolist() == np.full((3, 4, 3), 255).tolist()  # over white
    Image.new("CMYK", (5, 5), (0, 255, 255, 0)).save(corpus / "red.jpg")
    red = images.decode_image(corpus / "red.jpg").reshape(-1, 3).mean(axis=0)
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    # Pillow's decompression-bomb guard keeps its default; the header alone is enough to refuse.
    with pytest.raises(DecodeError, match=r"20000x20000 = 400000000 pixels, more than --max-pixels 178956970"):
        images.decode_image(corpus / "bomb.png")
    assert images.decode_image(corpus / "big.png", max_pixels=12000).shape == (100, 120, 3)
    with pytest.raises(DecodeError, match="is a folder"):
        images.decode_image(corpus / "sub")


def _listed_run(args: list[str], out: Path, stdin: str | None = None) -> tuple[object, dict[str, dict]]:
    command = ["explain", *args, "-o", str(out), *TINY, "--workers", "0", "--json"]
    result = CliRunner().invoke(main, command, input=stdin)
    return result, _records(out)


def _all_inside(out: Path) -> None:
    root = out.resolve()
    for path in out.rglob("*"):
        assert not path.is_symlink(), path
        assert path.resolve().is_relative_to(root), path


def test_files_from_with_climbing_absolute_and_linked_paths_stays_inside_out(tmp_path, tiny_factory):
    write_image(tmp_path / "data" / "a.png", 30, 20, 1)
    write_image(tmp_path / "other" / "b.png", 20, 30, 2)
    write_image(tmp_path / "other" / "c.jpg", 25, 25, 3)
    os.symlink(tmp_path / "other", tmp_path / "data" / "to_other")
    (tmp_path / "work").mkdir()
    os.chdir(tmp_path / "work")  # tiny_factory's monkeypatch restores the working directory
    listing = (
        "\n".join(
            [
                "# inputs for tonight",
                "../data/a.png",
                "",
                str(tmp_path / "other" / "b.png"),
                "../data/to_other/c.jpg",
                "../../../../../../../../../.." + str(tmp_path / "other" / "c.jpg"),
                "../data",  # a folder named in a list is reported, not walked
            ]
        )
        + "\n"
    )
    (tmp_path / "list.txt").write_text(listing)
    out = tmp_path / "work" / "out"
    sys_path_model = ["--model", tiny_factory]
    result, records = _listed_run(["--files-from", str(tmp_path / "list.txt"), *sys_path_model], out)
    assert result.exit_code == 3, result.output
    assert set(records) == {
        "../data/a.png",
        str(tmp_path / "other" / "b.png"),
        "../data/to_other/c.jpg",
        "../../../../../../../../../.." + str(tmp_path / "other" / "c.jpg"),
        "../data",
    }
    assert records["../data"]["status"] == "error" and records["../data"]["error"] == "is a folder, not an image file"
    for path, record in records.items():
        if path != "../data":
            assert record["status"] == "ok", record
            _check_ok_outputs(out, record, Image.open(path).size)
    expected_a = out / str(tmp_path / "data" / "a.png").lstrip("/")
    assert Path(f"{expected_a}.gradcam.png").is_file()  # climbing paths are kept whole under OUT
    _all_inside(out)

    # The same list on stdin gives the same outputs, all skipped as complete.
    again, records_again = _listed_run(["--files-from", "-", *sys_path_model], out, stdin=listing)
    assert again.exit_code == 3, again.output
    assert json.loads(again.stdout)["skipped"] == 4 and records_again == records


def test_a_folder_given_through_a_symlink_keeps_outputs_inside_out(tmp_path, tiny_factory):
    write_image(tmp_path / "real" / "x" / "y.png", 21, 17, 1)
    os.symlink(tmp_path / "real", tmp_path / "alias")
    out = tmp_path / "out"
    result, records = _listed_run([str(tmp_path / "alias"), "--model", tiny_factory], out)
    assert result.exit_code == 0, result.output
    assert list(records) == [str(tmp_path / "alias" / "x" / "y.png")]
    assert (out / "x" / "y.png.gradcam.png").is_file()
    _all_inside(out)
