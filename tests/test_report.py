"""`camx report`: the page's data, thumbnails, links, incremental re-runs and errors (no browser here;
tests/test_report_browser.py opens the page in Chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
from click.testing import CliRunner
from conftest import camx_script, write_image
from PIL import Image

from cam_cli.cli import main
from cam_cli.cli.report import report
from cam_cli.report import build_report, script_json, url_path
from cam_cli.report.thumbs import jpeg_size, render_thumbnail

HOSTILE_KEYS = [
    "<img src=x onerror=alert(1)>.png",
    "a#b?c%d \"q\" 'q'.jpg",
    "ünï 猫.jpg",
    "sub dir/x y&z.jpg",
    "</script><script>alert(2)</script>.jpg",
    "%2e%2e.jpg",
]


def invoke_report(*args: object) -> object:
    return CliRunner().invoke(report, [str(a) for a in args])


def explain(*args: object) -> None:
    result = CliRunner().invoke(main, ["explain", *[str(a) for a in args]])
    assert result.exit_code == 0, result.output


def real_run(image_dir: Path, tiny_factory: str, out: Path, one_pass: bool = True) -> Path:
    """A real camx run with two methods into one OUT: ``--method gradcam,cam``, or one run per method."""
    common = ["-o", out, "--model", tiny_factory, "--weights", "NONE", "--input-size", "32", "--workers", "0", "-q"]
    if one_pass:
        explain(image_dir, *common, "--method", "gradcam,cam")
    else:
        explain(image_dir, *common, "--method", "gradcam")
        explain(image_dir, *common, "--method", "cam")
    return out


#: ground-truth boxes for two of ``image_dir``'s six images
BOXES = "key,x0,y0,x1,y1\na.jpg,0,0,67,45\nb.png,0,0,20,30\n"


def evaluated_run(image_dir: Path, tiny_factory: str, out: Path, *args: object) -> Path:
    """``real_run`` (``gradcam,cam``), then a real ``camx evaluate`` of it with ``args``."""
    from cam_cli.cli.evaluate import evaluate

    real_run(image_dir, tiny_factory, out)
    common = ["--model", tiny_factory, "--weights", "NONE", "--steps", "2", "--workers", "0", "--device", "cpu", "-q"]
    result = CliRunner().invoke(evaluate, [str(out), *common, *[str(a) for a in args]])
    assert result.exit_code == 0, result.output + result.stderr
    return out


def with_boxes(tmp_path: Path) -> list[object]:
    """evaluate's options for every metric, pointing and IoU over ``BOXES``."""
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(BOXES)
    return ["--metrics", "all", "--boxes-from", boxes]


def page_data(index: Path) -> dict:
    text = index.read_text("utf-8")
    match = re.search(r'<script type="application/json" id="camx-data">(.*?)</script>', text, re.S)
    assert match, "no data block in the page"
    return json.loads(match.group(1))


def record(key: str, method: str, input_path: Path | None, **extra: object) -> dict:
    """A manifest line in the exact format camx writes."""
    line = {
        "input": str(input_path) if input_path else key,
        "key": key,
        "status": "ok",
        "error": None,
        "overlay": f"{key}.{method}.jpg",
        "map": f"{key}.{method}.npy",
        "class_index": 1,
        "class_name": "tabby cat",
        "score": 0.5,
        "method": method,
        "model": "resnet18",
        "weights": "DEFAULT",
        "layer": "layer4",
        "target": "top1",
        "input_size": 224,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "precision": "fp32",
        "alpha": 0.4,
        "width": 40,
        "height": 30,
        "targets": [],
    }
    line.update(extra)
    line["targets"] = [
        {
            "rank": 1,
            "class_index": line["class_index"],
            "class_name": line["class_name"],
            "score": line["score"],
            "overlay": line["overlay"],
            "map": line["map"],
        }
    ]
    if line["status"] != "ok":
        line.update(overlay=None, map=None, class_index=None, class_name=None, score=None, targets=[])
    return line


def hand_run(
    tmp_path: Path, keys: list[str], methods: tuple[str, ...] = ("gradcam", "cam"), per_key: dict | None = None
) -> Path:
    """OUT with a hand-written manifest: every key has an input image and an overlay per method.

    ``per_key`` maps a key to a dict of fields for its lines (e.g. a class or an error).
    """
    out = tmp_path / "out"
    images = tmp_path / "imgs"
    lines = []
    for n, key in enumerate(keys):
        source = write_image(images / key, 40, 30, seed=n)
        for method in methods:
            extra = dict((per_key or {}).get(key, {}))
            line = record(key, method, source, **extra)
            if line["status"] == "ok":
                write_image(out / line["overlay"], 40, 30, seed=100 + n, fmt="JPEG")
            lines.append(line)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.jsonl").write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), "utf-8")
    return out


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


# ------------------------------------------------------------------- real runs


def test_report_of_a_real_two_method_run(image_dir, tiny_factory, tmp_path):
    out = real_run(image_dir, tiny_factory, tmp_path / "out")
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 12 and {r["method"] for r in manifest} == {"gradcam", "cam"}

    result = invoke_report(out)
    assert result.exit_code == 0, result.output + result.stderr
    index = out / "report" / "index.html"
    assert result.stdout.strip() == str(index)
    assert {"index.html", "report.css", "report.js"} <= {p.name for p in (out / "report").iterdir()}

    data = page_data(index)
    assert data["methods"] == ["cam", "gradcam"]
    assert data["run"]["inputs"] == 6 and data["run"]["maps"] == 12 and data["run"]["failed"] == 0
    assert data["run"]["model"] == [tiny_factory]
    assert [item["k"] for item in data["items"]] == sorted({r["key"] for r in manifest})
    by_line = {(r["key"], r["method"]): r for r in manifest}
    report_dir = out / "report"
    for item in data["items"]:
        # the original, upright and small, made from the manifest's input path
        with Image.open(report_dir / data["thumbs"] / item["i"]) as thumb:
            original = Image.open(by_line[(item["k"], "cam")]["input"])
            assert thumb.format == "JPEG" and max(thumb.size) <= 200
            assert abs(thumb.size[0] / thumb.size[1] - original.size[0] / original.size[1]) < 0.1
        assert len(item["m"]) == 2
        for entry in item["m"]:
            line = by_line[(item["k"], data["methods"][entry["i"]])]
            assert entry["c"] == (line["class_name"] or f"class {line['class_index']}")
            assert entry["s"] == pytest.approx(line["score"])
            # the link opens the full-resolution overlay in OUT
            target = (report_dir / unquote(entry["h"])).resolve()
            assert target == (out / line["overlay"]).resolve() and target.is_file()
            assert Image.open(report_dir / data["thumbs"] / entry["t"]).size[0] > 0
    # every file the report wrote is inside the report folder; nothing else in OUT changed
    assert all(report_dir in p.resolve().parents for p in files_under(report_dir))
    written = {r[field].split("/")[0] for r in manifest for field in ("overlay", "map")}
    assert sorted(p.name for p in out.iterdir() if p.name != "report") == sorted([*written, "manifest.jsonl"])


def test_build_report_into_another_folder_links_back_to_the_run(image_dir, tiny_factory, tmp_path):
    out = real_run(image_dir, tiny_factory, tmp_path / "out", one_pass=False)
    dest = tmp_path / "pages" / "run one"
    index = build_report(out, dest)
    assert index == dest / "index.html" and index.is_file()
    assert not (out / "report").exists()
    data = page_data(index)
    for item in data["items"]:
        for entry in item["m"]:
            assert entry["h"].startswith("../../out/")
            assert (dest / unquote(entry["h"])).is_file()


def test_metrics_of_a_real_evaluate_run(image_dir, tiny_factory, tmp_path):
    from cam_cli.cli.evaluate import evaluate

    out = real_run(image_dir, tiny_factory, tmp_path / "out")
    args = ["--model", tiny_factory, "--weights", "NONE", "--steps", "4", "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(evaluate, [str(out), *args])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "metrics-summary.json").read_text())
    data = page_data(build_report(out))
    table = data["metrics"]
    assert table["source"] == "metrics-summary.json"
    assert data["lineMetrics"][:4] == ["deletion_auc", "insertion_auc", "drop", "increase"]
    assert [row["method"] for row in table["rows"]] == summary["ranking"]
    assert {"deletion_auc", "insertion_auc"} <= set(table["names"])
    for row in table["rows"]:
        mine = [line for line in lines if line["method"] == row["method"] and line["status"] == "ok"]
        assert row["n"] == len(mine) == 6
        for name in ("deletion_auc", "insertion_auc"):
            # the summary's mean is the mean of the lines, and the page shows it with its interval
            assert row["mean"][name] == pytest.approx(sum(line[name] for line in mine) / len(mine), abs=1e-5)
            assert row["low"][name] <= row["mean"][name] <= row["high"][name]
        assert table["better"]["deletion_auc"] == "lower" and table["better"]["insertion_auc"] == "higher"
    # each card has its own lines' values, not the settings that shaped them
    by_line = {(line["key"], line["method"]): line for line in lines}
    for item in data["items"]:
        for entry in item["m"]:
            line = by_line[(item["k"], data["methods"][entry["i"]])]
            assert entry["x"]["deletion_auc"] == pytest.approx(line["deletion_auc"])
            assert "steps" not in entry["x"] and "score" not in entry["x"]
    # without the summary, the table is the mean of metrics.jsonl's lines
    (out / "metrics-summary.json").unlink()
    fallback = page_data(build_report(out))["metrics"]
    assert fallback["source"] == "metrics.jsonl"
    assert fallback["names"] == table["names"]  # the summary's statistics, scaled as it scales them
    for row in fallback["rows"]:
        mine = [line for line in lines if line["method"] == row["method"]]
        drop = 100 * sum(line["drop"] for line in mine) / len(mine)
        assert row["mean"]["average_drop_pct"] == pytest.approx(drop, abs=1e-4)


def test_the_header_counts_images_and_maps_apart(image_dir, tiny_factory, tmp_path):
    (image_dir / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    common = ["-o", out, "--model", tiny_factory, "--weights", "NONE", "--input-size", "32", "--workers", "0", "-q"]
    result = CliRunner().invoke(main, ["explain", str(image_dir), *[str(a) for a in common], "--method", "gradcam,cam"])
    assert result.exit_code == 3, result.output  # finished, some inputs failed
    facts = page_data(build_report(out))["run"]
    # 7 images; 6 of them explained by 2 methods: 12 maps, the broken one's 2 lines failed
    assert (facts["inputs"], facts["maps"], facts["failed"], facts["skipped"]) == (7, 12, 2, 0)
    assert "done" not in facts


def test_each_metric_has_its_own_count_and_the_registrys_title(image_dir, tiny_factory, tmp_path):
    from cam_cli.metrics import statistic

    out = evaluated_run(image_dir, tiny_factory, tmp_path / "out", *with_boxes(tmp_path))
    summary = json.loads((out / "metrics-summary.json").read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for table in (page_data(build_report(out))["metrics"], None):
        if table is None:  # without the summary: counted over metrics.jsonl's lines
            (out / "metrics-summary.json").unlink()
            table = page_data(build_report(out))["metrics"]
            assert table["source"] == "metrics.jsonl"
        names = table["names"]
        assert names[names.index("pointing_pct") + 1] == "iou"
        assert {"sparseness", "complexity", "energy_pointing", "mask_auc"} <= set(names)
        assert table["better"]["complexity"] == "lower" and table["better"]["energy_pointing"] == "higher"
        assert table["titles"] == {name: statistic(name).title for name in table["names"]}
        assert table["titles"]["increase_in_confidence_pct"] == "Incr. Conf. %"
        for row in table["rows"]:
            mine = [line for line in lines if line["method"] == row["method"]]
            hits = [line["pointing_hit"] for line in mine if line["pointing_hit"] is not None]
            assert row["n"] == 6 and len(hits) == 2  # only a.jpg and b.png have a box
            assert row["count"]["pointing_pct"] == row["count"]["iou"] == 2
            assert row["count"]["energy_pointing"] == row["count"]["relevance_rank"] == 2  # boxes as regions
            assert row["count"]["sparseness"] == row["count"]["complexity"] == 6
            assert row["count"]["deletion_auc"] == row["count"]["average_drop_pct"] == 6
            assert row["mean"]["pointing_pct"] == pytest.approx(100 * sum(hits) / 2)
            assert row["count"]["pointing_pct"] == summary["methods"][row["method"]]["metrics"]["pointing_pct"]["n"]


def test_equal_maps_share_a_rank_and_none_is_bold(image_dir, positive_factory, tmp_path):
    import numpy as np

    out = evaluated_run(image_dir, positive_factory, tmp_path / "out")
    manifest = {(r["key"], r["method"]): r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    for key in {k for k, _ in manifest}:  # GAP + positive linear head: Grad-CAM's map is CAM's
        cam, gradcam = (np.load(out / manifest[(key, m)]["map"]) for m in ("cam", "gradcam"))
        np.testing.assert_allclose(cam, gradcam, atol=1e-5)
    summary = json.loads((out / "metrics-summary.json").read_text())
    assert {m: e["rank"] for m, e in summary["methods"].items()} == {"cam": 1, "gradcam": 1}
    table = page_data(build_report(out))["metrics"]
    assert [row["rank"] for row in table["rows"]] == [1, 1]
    assert [row["method"] for row in table["rows"]] == summary["ranking"]
    assert table["best"] == {}


def test_only_a_difference_the_intervals_support_is_bold(tmp_path):
    out = hand_run(tmp_path, ["a.jpg"], methods=("cam", "gradcam", "random"))

    def stat(mean: float, low: float, high: float, better: str) -> dict:
        return {"n": 1, "mean": mean, "low": low, "high": high, "better": better}

    def method(rank: int, deletion: tuple, insertion: tuple) -> dict:
        metrics = {"deletion_auc": stat(*deletion, "lower"), "insertion_auc": stat(*insertion, "higher")}
        return {"n": 1, "rank": rank, "metrics": metrics}

    summary = {
        "ranking": ["gradcam", "cam", "random"],
        "methods": {
            # deletion: gradcam's interval is clear of cam's, the runner-up; insertion: the best two overlap
            "cam": method(1, (0.3, 0.25, 0.35), (0.6, 0.5, 0.7)),
            "gradcam": method(1, (0.1, 0.05, 0.2), (0.65, 0.55, 0.75)),
            "random": method(3, (0.5, 0.4, 0.6), (0.2, 0.1, 0.3)),
        },
    }
    (out / "metrics-summary.json").write_text(json.dumps(summary))
    table = page_data(build_report(out))["metrics"]
    assert [(row["method"], row["rank"]) for row in table["rows"]] == [("gradcam", 1), ("cam", 1), ("random", 3)]
    assert table["best"] == {"deletion_auc": "gradcam"}


def test_the_report_does_not_import_torch(tmp_path):
    out = hand_run(tmp_path, ["a.jpg", "b.jpg"])
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from cam_cli.cli.report import report\n"
        f"result = CliRunner().invoke(report, [{str(out)!r}, '-q'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert (out / "report" / "index.html").is_file()
    # the installed console script, as users run it: prints the page, imports no torch
    shutil.rmtree(out / "report")
    done = subprocess.run(
        [sys.executable, "-X", "importtime", camx_script(), "report", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == f"{out / 'report' / 'index.html'}\n"
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "cam_cli.report" in imported and not [m for m in imported if m.split(".")[0] == "torch"]


# ---------------------------------------------------------------- incremental


def test_a_rerun_makes_only_new_or_changed_thumbnails(tmp_path):
    out = hand_run(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    first = invoke_report(out, "--json")
    assert first.exit_code == 0, first.output
    counts = json.loads(first.stdout)
    assert counts["thumbnails_made"] == 9 and counts["thumbnails_reused"] == 0  # 3 inputs + 3 x 2 overlays
    thumbs = out / "report" / "thumbs"
    before = {p: p.stat().st_mtime_ns for p in files_under(thumbs) if p.suffix == ".jpg"}
    assert len(before) == 9

    again = json.loads(invoke_report(out, "--json").stdout)
    assert again["thumbnails_made"] == 0 and again["thumbnails_reused"] == 9

    # one overlay changes (new content, new size): only its thumbnail is made again
    write_image(out / "b.jpg.cam.jpg", 64, 20, seed=9, fmt="JPEG")
    changed = json.loads(invoke_report(out, "--json").stdout)
    assert changed["thumbnails_made"] == 1 and changed["thumbnails_reused"] == 8
    data = page_data(out / "report" / "index.html")
    entry = next(e for e in data["items"][1]["m"] if data["methods"][e["i"]] == "cam")
    with Image.open(thumbs / entry["t"]) as thumb:
        assert thumb.size == (64, 20)  # the new overlay, never enlarged
    after = {p: p.stat().st_mtime_ns for p in files_under(thumbs) if p.suffix == ".jpg"}
    assert [p for p in before if after[p] != before[p]] == [thumbs / entry["t"]]

    # an input leaves the manifest: its thumbnails leave the report
    lines = (out / "manifest.jsonl").read_text("utf-8").splitlines()
    kept = [line for line in lines if json.loads(line)["key"] != "c.jpg"]
    (out / "manifest.jsonl").write_text("\n".join(kept) + "\n", "utf-8")
    shrunk = json.loads(invoke_report(out, "--json").stdout)
    assert shrunk["thumbnails_removed"] == 3 and shrunk["inputs"] == 2
    assert len([p for p in files_under(thumbs) if p.suffix == ".jpg"]) == 6


# --------------------------------------------------------------------- safety


def test_hostile_names_are_data_never_markup(tmp_path):
    out = hand_run(tmp_path, HOSTILE_KEYS, per_key={HOSTILE_KEYS[0]: {"class_name": "</script><b>x</b>"}})
    index = build_report(out)
    text = index.read_text("utf-8")
    block = text.split('id="camx-data">', 1)[1].rsplit("</script>", 2)[0]
    for dangerous in ("<", ">", "&", "\u2028", "\u2029"):
        assert dangerous not in block.split("</script>")[0]
    assert text.count("<script") == 2  # the data block and report.js, nothing from a name
    data = page_data(index)
    assert [item["k"] for item in data["items"]] == sorted(HOSTILE_KEYS)
    assert "</script><b>x</b>" in data["classes"]
    report_dir = out / "report"
    for item in data["items"]:
        for entry in item["m"]:
            # thumbnails are named by a hash; links are percent-encoded per segment and load the overlay
            assert re.fullmatch(r"[0-9a-f]{2}/m-[0-9a-f]{24}\.jpg", entry["t"])
            assert re.fullmatch(r"[A-Za-z0-9._~%/-]+", entry["h"]), entry["h"]
            assert (report_dir / unquote(entry["h"])).resolve() == (
                out / f"{item['k']}.{data['methods'][entry['i']]}.jpg"
            )
    assert all(re.fullmatch(r"[A-Za-z0-9._/-]+", p.relative_to(report_dir).as_posix()) for p in files_under(report_dir))


def test_script_json_and_url_path_escape_what_could_break_out():
    tricky = {"k": "</script><!-- \u2028\u2029 & > ü"}
    text = script_json(tricky)
    assert not set(text) & set("<>&\u2028\u2029") and text.isascii()
    assert json.loads(text) == tricky
    assert url_path("a#b/c?d%e f/ü.jpg") == "a%23b/c%3Fd%25e%20f/%C3%BC.jpg"


def test_overlays_outside_out_are_neither_read_nor_linked(tmp_path):
    secret = write_image(tmp_path / "secret.jpg", 40, 30, fmt="JPEG")
    out = hand_run(tmp_path, ["a.jpg"], methods=("gradcam",))
    line = json.loads((out / "manifest.jsonl").read_text())
    for n, overlay in enumerate(["../secret.jpg", str(secret)]):
        line.update(key=f"x{n}.jpg", overlay=overlay)
        with open(out / "manifest.jsonl", "a") as handle:
            handle.write(json.dumps(line) + "\n")
    data = page_data(build_report(out))
    bad = [item for item in data["items"] if item["k"].startswith("x")]
    assert len(bad) == 2 and all("h" not in e and "t" not in e for item in bad for e in item["m"])


# ------------------------------------------------------- failures, parts, metrics


def test_failed_lines_are_counted_and_keep_their_reasons(tmp_path):
    out = hand_run(
        tmp_path,
        ["good.jpg", "broken.png"],
        per_key={"broken.png": {"status": "error", "error": "not a recognised image file"}},
    )
    data = page_data(build_report(out))
    assert data["run"]["inputs"] == 2 and data["run"]["maps"] == 2 and data["run"]["failed"] == 2
    broken = next(item for item in data["items"] if item["k"] == "broken.png")
    assert broken["f"] == 1 and "i" not in broken
    assert [e["e"] for e in broken["m"]] == ["not a recognised image file"] * 2
    assert "f" not in next(item for item in data["items"] if item["k"] == "good.jpg")


def test_shard_parts_without_a_merged_manifest(tmp_path):
    out = hand_run(tmp_path, ["a.jpg", "b.jpg", "c.jpg"], methods=("gradcam",))
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").unlink()
    (out / "manifest.shard-1-of-2.jsonl").write_text(lines[0] + "\n" + lines[2] + "\n")
    # shard 2 was killed: its records are only in its journal, the last line torn
    (out / ".manifest.shard-2-of-2.jsonl.journal").write_text(lines[1] + "\n" + lines[1][:20])
    data = page_data(build_report(out))
    assert [item["k"] for item in data["items"]] == ["a.jpg", "b.jpg", "c.jpg"]


def test_a_run_in_progress_is_shown_from_its_journal(tmp_path):
    out = hand_run(tmp_path, ["a.jpg", "b.jpg"], methods=("gradcam",))
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text(lines[0] + "\n")
    (out / ".manifest.jsonl.journal").write_text(lines[1] + "\n")
    data = page_data(build_report(out))
    assert [item["k"] for item in data["items"]] == ["a.jpg", "b.jpg"]
    manifest.unlink()  # the first run into OUT, still going: only its journal so far
    data = page_data(build_report(out))
    assert [item["k"] for item in data["items"]] == ["b.jpg"]


def test_metrics_table_from_metrics_jsonl(tmp_path):
    out = hand_run(tmp_path, ["a.jpg", "b.jpg"])
    rows = [
        {"key": "a.jpg", "method": "gradcam", "class_index": 1, "deletion_auc": 0.2, "insertion_auc": 0.6, "steps": 50},
        {"key": "b.jpg", "method": "gradcam", "class_index": 1, "deletion_auc": 0.4, "insertion_auc": 0.8, "steps": 50},
        {"key": "a.jpg", "method": "cam", "class_index": 1, "deletion_auc": 0.3, "pointing_hit": True},
        {"key": "b.jpg", "method": "cam", "status": "error", "error": "map missing"},
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn": ')
    data = page_data(build_report(out))
    table = data["metrics"]
    assert table["names"] == ["deletion_auc", "insertion_auc", "pointing_pct"]  # not steps
    titles = {"deletion_auc": "deletion AUC", "insertion_auc": "insertion AUC", "pointing_pct": "pointing %"}
    assert table["titles"] == titles
    by_method = {row["method"]: row for row in table["rows"]}
    assert by_method["gradcam"]["n"] == 2
    assert by_method["gradcam"]["mean"]["deletion_auc"] == pytest.approx(0.3)
    assert by_method["gradcam"]["mean"]["insertion_auc"] == pytest.approx(0.7)
    assert by_method["gradcam"]["count"] == {"deletion_auc": 2, "insertion_auc": 2, "pointing_pct": 0}
    assert by_method["cam"]["n"] == 1 and by_method["cam"]["mean"]["pointing_pct"] == 100.0
    assert by_method["cam"]["count"] == {"deletion_auc": 1, "insertion_auc": 0, "pointing_pct": 1}
    assert table["best"] == {}  # no intervals: nothing to tell a difference by
    item = data["items"][0]
    entry = next(e for e in item["m"] if data["methods"][e["i"]] == "gradcam")
    assert entry["x"] == {"deletion_auc": 0.2, "insertion_auc": 0.6}


def test_the_original_thumbnail_is_upright_and_a_missing_original_is_skipped(tmp_path):
    out = hand_run(tmp_path, ["rotated.jpg", "gone.jpg"], methods=("gradcam",))
    rotated = tmp_path / "imgs" / "rotated.jpg"
    image = Image.new("RGB", (80, 40), (200, 20, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: 40 wide, 80 high
    image.save(rotated, exif=exif)
    (tmp_path / "imgs" / "gone.jpg").unlink()
    data = page_data(build_report(out))
    items = {item["k"]: item for item in data["items"]}
    assert "i" not in items["gone.jpg"] and "t" in items["gone.jpg"]["m"][0]
    with Image.open(out / "report" / data["thumbs"] / items["rotated.jpg"]["i"]) as thumb:
        assert thumb.size[1] > thumb.size[0]


def test_jpeg_size_reads_the_frame_header_as_pillow_does(tmp_path):
    baseline = write_image(tmp_path / "a.jpg", 67, 45, fmt="JPEG")
    progressive = tmp_path / "p.jpg"
    Image.open(baseline).save(progressive, progressive=True)
    rotated = tmp_path / "r.jpg"
    image = Image.open(baseline)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(rotated, exif=exif)
    for path in (baseline, progressive, rotated):
        assert jpeg_size(path.read_bytes()) == Image.open(path).size == (67, 45)
    assert jpeg_size(write_image(tmp_path / "b.png", 5, 5).read_bytes()) is None
    assert jpeg_size(b"\xff\xd8\xff") is None
    # a header claiming far more pixels than camx would decode: no thumbnail, and no attempt
    data = bytearray(baseline.read_bytes())
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = (60000).to_bytes(2, "big") * 2
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="too large"):
        render_thumbnail(bomb)


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize("what", ["empty", "missing", "file", "no-records"])
def test_no_manifest_is_one_line_error_and_nothing_written(tmp_path, what):
    out = tmp_path / "out"
    if what == "empty":
        out.mkdir()
    elif what == "file":
        out.write_text("x")
    elif what == "no-records":
        out.mkdir()
        (out / "manifest.jsonl").write_text("")
    result = invoke_report(out, "-o", tmp_path / "dest")
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("camx: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert str(out) in result.stderr
    assert not (tmp_path / "dest").exists() and not (tmp_path / "out" / "report").exists()


def test_an_unwritable_report_folder_is_one_line_error(tmp_path):
    out = hand_run(tmp_path, ["a.jpg"])
    (tmp_path / "taken").write_text("a file")
    result = invoke_report(out, "-o", tmp_path / "taken" / "report", "--json")
    assert result.exit_code == 1
    assert "is not a folder" in result.stderr
    assert json.loads(result.stdout)["exit_status"] == 1


def test_report_help_has_an_example():
    result = invoke_report("--help")
    assert result.exit_code == 0
    assert "camx report ./out" in result.stdout and "-o, --out" in result.stdout


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() == 0, reason="root can write anywhere")
def test_a_read_only_report_folder(tmp_path):
    out = hand_run(tmp_path, ["a.jpg"])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = invoke_report(out, "-o", locked / "r")
    assert result.exit_code == 1 and "not writable" in result.stderr


def test_missing_overlays_get_a_one_line_note_and_exit_0(tmp_path):
    out = hand_run(tmp_path, ["a.jpg", "b.jpg"])
    whole = CliRunner().invoke(main, ["report", str(out), "-q"])
    assert whole.exit_code == 0 and "note" not in whole.stderr, whole.output
    (out / "a.jpg.gradcam.jpg").unlink()
    (out / "b.jpg.cam.jpg").unlink()
    result = CliRunner().invoke(main, ["report", str(out), "-q"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("camx: note: ")]
    assert notes == [
        f"camx: note: 2 overlays named in the manifest of {out} not found there; their cards show no picture "
        "(run camx explain again to redo them)"
    ]
    assert result.stdout.strip() == str(out / "report" / "index.html")
    (out / "a.jpg.gradcam.jpg").write_bytes((out / "a.jpg.cam.jpg").read_bytes())
    one = CliRunner().invoke(main, ["report", str(out), "--json"])
    assert "camx: note: 1 overlay named" in one.stderr and json.loads(one.stdout)["missing_overlays"] == 1


def similarity_run(tmp_path: Path, kind: str = "similar") -> Path:
    """OUT of a similarity run (``--target similar:q.png``): its scores are cosines, some negative."""
    keys = ["a.png", "b.png", "c.png", "d.png"]
    reference = {"kind": kind, "path": "q.png", "sha256": "0" * 64, "images": 1}
    per_key = {
        key: {"class_index": 0, "class_name": f"{kind}:q.png", "target": f"{kind}:q.png", "score": score,
              "reference": reference}
        for key, score in zip(keys, [0.2, -0.4, 0.9, 0.5], strict=True)
    }  # fmt: skip
    return hand_run(tmp_path, keys, methods=("gradcam",), per_key=per_key)


def test_a_similarity_run_opens_sorted_by_its_score_and_others_by_name(tmp_path):
    data = page_data(build_report(similarity_run(tmp_path / "sim")))
    assert data["sort"] == "score"
    assert {item["k"]: item["s"] for item in data["items"]} == {"a.png": 0.2, "b.png": -0.4, "c.png": 0.9,
                                                                 "d.png": 0.5}  # fmt: skip
    assert page_data(build_report(hand_run(tmp_path / "cls", ["a.png", "b.png"])))["sort"] == "key"
