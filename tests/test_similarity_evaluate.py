"""``camx evaluate`` on similarity runs (``--target similar:REF`` / ``dissimilar:REF`` /
``--target-embedding``): the reference rebuilt from what the manifest records, every
perturbed copy scored by its similarity to it (not a softmax), and a changed reference
refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from clip_helpers import read_manifest, run_camx, write_images
from conftest import write_image
from test_hf_embedding import SIZE, Embedder, processed, save_folder

from cam_cli import rundir
from cam_cli.cli.evaluate import evaluate
from cam_cli.metrics import MetricOptions
from cam_cli.metrics.base import Samples, run_plans
from cam_cli.metrics.confidence import ConfidencePlan
from cam_cli.metrics.rise import make_plan

pytest.importorskip("transformers")

FAST = ["--device", "cpu", "--workers", "0"]


def run(out: Path, *args: str) -> tuple[int, dict, str]:
    """``camx evaluate OUT --json ...``: exit status, the JSON object, stderr."""
    result = CliRunner().invoke(evaluate, [str(out), *FAST, "--json", *args], catch_exceptions=False)
    payload = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    return result.exit_code, payload, result.stderr


def lines_of(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["key"], r["method"]): r for r in rundir.read_records(out / "metrics.jsonl")}


def similarity(model: Embedder, concept: torch.Tensor, kind: str = "similar"):
    """The scalar explain explained, computed here: ``(n, 1)`` per batch of model inputs."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        cosine = F.cosine_similarity(model(x), concept[None], dim=1)
        return (cosine if kind == "similar" else 1 - cosine)[:, None]

    return forward


@pytest.mark.slow
def test_the_metrics_follow_the_similarity_to_the_recorded_reference(tmp_path: Path) -> None:
    folder = save_folder(tmp_path / "enc")
    write_images(tmp_path / "imgs", 3, SIZE)
    query = write_image(tmp_path / "query.png", SIZE, SIZE, seed=42)
    out = tmp_path / "out"
    run_camx(tmp_path / "imgs", "-o", out, "--model", f"hf:{folder}", "--target", f"similar:{query}", "--method",
             "gradcam,eigencam", *FAST, "-q")  # fmt: skip
    code, payload, stderr = run(out, "--metrics", "deletion,insertion,confidence", "--steps", "4")
    assert code == 0, stderr
    assert payload["done"] == 6 and payload["failed"] == 0
    assert payload["warnings"] == []  # the rebuilt similarity is the manifest's score
    model = Embedder(folder)
    with torch.no_grad():
        forward = similarity(model, model(processed(folder, [query]))[0])
    lines = lines_of(out)
    for record in read_manifest(out):
        line = lines[(record["key"], record["method"])]
        x = processed(folder, [tmp_path / "imgs" / record["key"]])
        native = torch.from_numpy(np.load(out / record["map"]))
        resized = F.interpolate(native[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
        samples = Samples(x, resized, torch.tensor([0]))
        with torch.no_grad():
            theirs = run_plans(samples, [make_plan(samples, ["deletion", "insertion"], MetricOptions(steps=4))],
                               forward, 32, lambda x, classes: forward(x)[:, 0])  # fmt: skip
            y, o = float(forward(x)), float(forward(x * resized[:, None]))
        assert line["score"] == pytest.approx(y, abs=1e-5) and record["score"] == pytest.approx(y, abs=1e-5)
        assert line["deletion_auc"] == pytest.approx(float(theirs["deletion_auc"]), abs=1e-5)
        assert line["insertion_auc"] == pytest.approx(float(theirs["insertion_auc"]), abs=1e-5)
        assert line["increase"] == float(o > y)
        if y > 0:
            assert line["drop"] == pytest.approx(max(0.0, y - o) / y, abs=1e-4)
        else:  # a share of a negative similarity means nothing
            assert line["drop"] is None
    summary = json.loads((out / "metrics-summary.json").read_text())
    assert sorted(summary["methods"]) == ["eigencam", "gradcam"]


def test_a_dissimilar_npy_reference_and_a_changed_or_missing_one(tmp_path: Path) -> None:
    folder = save_folder(tmp_path / "enc")
    paths = write_images(tmp_path / "imgs", 2, SIZE)
    model = Embedder(folder)
    with torch.no_grad():
        reference = model(processed(folder, [write_image(tmp_path / "q.png", SIZE, SIZE, seed=9)]))[0]
    npy = tmp_path / "ref.npy"
    np.save(npy, reference.numpy())
    out = tmp_path / "out"
    run_camx(tmp_path / "imgs", "-o", out, "--model", f"hf:{folder}", "--target", "dissimilar", "--target-embedding",
             npy, "--method", "gradcam", *FAST, "-q")  # fmt: skip
    code, payload, stderr = run(out, "--metrics", "confidence")
    assert code == 0 and payload["done"] == 2 and payload["warnings"] == [], stderr
    forward = similarity(model, reference, "dissimilar")
    lines = lines_of(out)
    for path in paths:
        with torch.no_grad():
            expected = float(forward(processed(folder, [path])))
        assert lines[(path.name, "gradcam")]["score"] == pytest.approx(expected, abs=1e-5)
    before = (out / "metrics.jsonl").read_bytes()
    np.save(npy, -reference.numpy())  # the same path, another vector
    code, payload, _ = run(out, "--metrics", "deletion", "--steps", "3")
    assert code == 1 and "\n" not in payload["error"]
    assert "changed since the run" in payload["error"] and str(npy) in payload["error"]
    npy.unlink()
    code, payload, _ = run(out, "--metrics", "deletion", "--steps", "3")
    assert code == 1 and "cannot rebuild the reference" in payload["error"] and "\n" not in payload["error"]
    assert (out / "metrics.jsonl").read_bytes() == before


def test_random_logit_is_refused_on_a_similarity_run_in_one_line(tmp_path: Path) -> None:
    folder = save_folder(tmp_path / "enc")
    write_images(tmp_path / "imgs", 1, SIZE)
    query = write_image(tmp_path / "query.png", SIZE, SIZE, seed=42)
    out = tmp_path / "out"
    run_camx(tmp_path / "imgs", "-o", out, "--model", f"hf:{folder}", "--target", f"similar:{query}", "--method",
             "gradcam", *FAST, "-q")  # fmt: skip
    code, payload, _ = run(out, "--metrics", "random-logit")
    assert code != 0 and "random-logit needs another class" in payload["error"] and "\n" not in payload["error"]
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_timm_model_without_its_head_is_rebuilt_without_it(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 2, SIZE)
    query = write_image(tmp_path / "query.png", SIZE, SIZE, seed=42)
    out = tmp_path / "out"
    run_camx(tmp_path / "imgs", "-o", out, "--model", "timm:resnet10t", "--num-classes", "0", "--weights", "NONE",
             "--input-size", SIZE, "--target", f"similar:{query}", "--method", "gradcam", *FAST, "-q")  # fmt: skip
    assert {r["num_classes"] for r in read_manifest(out)} == {0}
    code, payload, stderr = run(out, "--metrics", "confidence")
    assert code == 0 and payload["done"] == 2, stderr
    assert payload["warnings"] == []  # a 1,000-class head in its place would give other similarities
    scores = {r["key"]: r["score"] for r in read_manifest(out)}
    assert {k: line["score"] for (k, _), line in lines_of(out).items()} == pytest.approx(scores, abs=1e-5)


def test_the_drop_is_null_below_a_similarity_of_zero() -> None:
    samples = Samples(torch.zeros(3, 3, 2, 2), torch.ones(3, 2, 2), torch.zeros(3, dtype=torch.long))
    values = ConfidencePlan(samples).finish(torch.tensor([0.1, 0.1, 0.9]), torch.tensor([-0.2, 0.4, 0.6]))
    assert torch.isnan(values["drop"][0]) and values["increase"].tolist() == [1.0, 0.0, 1.0]
    assert values["drop"][1:].tolist() == pytest.approx([0.75, 0.0], abs=1e-6)


@pytest.mark.slow
def test_mprt_randomises_the_embedding_model_inside_the_similarity_head(tmp_path: Path) -> None:
    folder = save_folder(tmp_path / "enc")
    write_images(tmp_path / "imgs", 1, SIZE)
    query = write_image(tmp_path / "query.png", SIZE, SIZE, seed=42)
    out = tmp_path / "out"
    run_camx(tmp_path / "imgs", "-o", out, "--model", f"hf:{folder}", "--target", f"similar:{query}", "--method",
             "gradcam", *FAST, "-q")  # fmt: skip
    code, payload, stderr = run(out, "--metrics", "mprt")
    assert code == 0 and payload["done"] == 1, stderr
    line = lines_of(out)[("im0.png", "gradcam")]
    assert line["mprt_blocks"][-1] == "model.embeddings" and all(b.startswith("model.") for b in line["mprt_blocks"])
    assert line["mprt_spearman_curve"][-1] == line["mprt_spearman"] < 1.0  # the map changes with the weights
