"""Embedding models explained by similarity to a reference: every gradient and activation
method equals pytorch-grad-cam with ``SimilarityToConceptTarget`` (and
``DifferenceFromConceptTarget``) on a timm model (``--num-classes 0``) and a torchvision
ResNet without its head (a factory), at batch sizes 1 and 3; the reference, its record and
the resume rules."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from clip_helpers import METHODS, assert_maps_equal, pgc_maps, read_manifest, run_camx, tensor_of, write_images
from conftest import write_image
from torch import nn

from cam_cli.cli import main
from cam_cli.models import IMAGENET_MEAN, IMAGENET_STD

SIZE = 64


def resnet_embedder() -> nn.Module:
    """torchvision's ResNet-18 with its head removed: 512-value embeddings."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Identity()
    return model.eval()


@pytest.fixture
def embedder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "embedder_module.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_similarity import resnet_embedder\n"
        "def build():\n    return resnet_embedder()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("embedder_module", None)
    return "embedder_module:build"


def timm_embedder() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()


class SimilarityToConceptTarget:
    """pytorch-grad-cam's concept target, as its embeddings tutorial defines it (the 1.5.7
    package does not ship it): the cosine similarity of one image's output with ``features``."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return torch.nn.CosineSimilarity(dim=0)(model_output, self.features)


class DifferenceFromConceptTarget(SimilarityToConceptTarget):
    """The tutorial's other target: one minus that cosine similarity."""

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return 1 - super().__call__(model_output)


def reference_maps(model: nn.Module, layer: nn.Module, x: torch.Tensor, concept: torch.Tensor, kind: str) -> dict:
    target = SimilarityToConceptTarget if kind == "similar" else DifferenceFromConceptTarget
    return {m: pgc_maps(m, model, layer, x, [target(concept)] * len(x), None) for m in METHODS if m != "finercam"}


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("source", "kind"), [("timm", "similar"), ("torchvision", "similar"), ("timm", "dissimilar")])
def test_every_method_equals_pytorch_grad_cam_with_a_concept_target(
    source: str, kind: str, batch: int, tmp_path: Path, embedder: str
) -> None:
    paths = write_images(tmp_path / "imgs", 3, SIZE)
    query = write_image(tmp_path / "query.png", SIZE, SIZE, seed=42)
    model_args = ["--model", "timm:resnet10t", "--num-classes", "0"] if source == "timm" else ["--model", embedder]
    out = tmp_path / "out"
    methods = [m for m in METHODS if m != "finercam"]  # one scalar: no other class to compare with
    run_camx(tmp_path / "imgs", "-o", out, *model_args, "--weights", "NONE", "--input-size", SIZE, "--target",
             f"{kind}:{query}", "--method", ",".join(methods), "--batch-size", batch, "-q")  # fmt: skip
    model = timm_embedder() if source == "timm" else resnet_embedder()
    mean, std = (IMAGENET_MEAN, IMAGENET_STD)
    if source == "timm":
        cfg = model.pretrained_cfg
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    interpolation = (
        "bicubic" if source == "timm" and model.pretrained_cfg.get("interpolation") == "bicubic" else "bilinear"
    )
    x = tensor_of(paths, SIZE, mean, std, interpolation)
    with torch.no_grad():
        concept = model(tensor_of([query], SIZE, mean, std, interpolation))[0]
        cosine = torch.nn.functional.cosine_similarity(model(x), concept[None], dim=1)
    expected = cosine if kind == "similar" else 1 - cosine
    records = read_manifest(out)
    by_key = {r["key"]: r for r in records if r["method"] == "gradcam"}
    for i, path in enumerate(paths):  # the manifest's score is the explained scalar itself
        assert by_key[path.name]["score"] == pytest.approx(float(expected[i]), abs=1e-5)
        assert by_key[path.name]["target"] == f"{kind}:{query}"
    assert records[0]["layer"].startswith("model.")  # the embedding model inside the similarity head
    layer = model.get_submodule(records[0]["layer"].removeprefix("model."))
    for method, theirs in reference_maps(model, layer, x, concept, kind).items():
        assert_maps_equal(out, method, [p.name for p in paths], theirs, [0] * len(paths))


def test_a_folder_reference_is_its_mean_embedding_and_an_npy_file_the_same(tmp_path: Path, embedder: str) -> None:
    write_images(tmp_path / "imgs", 2, SIZE)
    refs = write_images(tmp_path / "refs", 3, SIZE, seed=10)
    model = resnet_embedder()
    with torch.no_grad():
        mean_embedding = model(tensor_of(refs, SIZE, IMAGENET_MEAN, IMAGENET_STD, "bilinear")).mean(0)
    np.save(tmp_path / "ref.npy", mean_embedding.numpy())
    common = ["--model", embedder, "--weights", "NONE", "--input-size", SIZE, "-q"]
    run_camx(tmp_path / "imgs", "-o", tmp_path / "a", *common, "--target", f"similar:{tmp_path / 'refs'}")
    run_camx(tmp_path / "imgs", "-o", tmp_path / "b", *common, "--target-embedding", tmp_path / "ref.npy")
    a, b = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-5)
    assert a[0]["reference"]["images"] == 3 and a[0]["reference"]["kind"] == "similar"
    assert b[0]["reference"]["path"] == str(tmp_path / "ref.npy") and len(b[0]["reference"]["sha256"]) == 64
    np.testing.assert_allclose(np.load(tmp_path / "a" / a[0]["map"]), np.load(tmp_path / "b" / b[0]["map"]),
                               atol=1e-4)  # fmt: skip


def test_resume_with_another_reference_is_refused_and_the_same_one_skips(tmp_path: Path, embedder: str) -> None:
    write_images(tmp_path / "imgs", 2, SIZE)
    first = write_image(tmp_path / "q1.png", SIZE, SIZE, seed=1)
    other = write_image(tmp_path / "q2.png", SIZE, SIZE, seed=2)
    common = [tmp_path / "imgs", "-o", tmp_path / "out", "--model", embedder, "--weights", "NONE", "--input-size",
              SIZE]  # fmt: skip
    run_camx(*common, "--target", f"similar:{first}", "-q")
    before = (tmp_path / "out" / "manifest.jsonl").read_bytes()
    again = run_camx(*common, "--target", f"similar:{first}", "-q", "--json")
    assert json.loads(again.output.strip().splitlines()[-1])["skipped"] == 2
    refused = CliRunner().invoke(main, ["explain", *[str(a) for a in common], "--target", f"similar:{other}"])
    assert refused.exit_code != 0 and "reference" in refused.output and "--overwrite" in refused.output
    assert (tmp_path / "out" / "manifest.jsonl").read_bytes() == before
    first.write_bytes(other.read_bytes())  # the same path, other bytes: another reference too
    changed = CliRunner().invoke(main, ["explain", *[str(a) for a in common], "--target", f"similar:{first}"])
    assert changed.exit_code != 0 and "sha256" in changed.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "similar"], "--target similar needs a reference"),
        (["--target", "similar:missing.png"], "no such file or folder"),
        (["--target", "similar:REF", "--target-embedding", "E"], "give --target similar or dissimilar"),
    ],
)
def test_bad_references_are_refused_in_one_line(tmp_path: Path, embedder: str, args: list, message: str) -> None:
    write_images(tmp_path / "imgs", 1, SIZE)
    np.save(tmp_path / "E.npy", np.zeros(512, dtype=np.float32))
    args = [str(tmp_path / "E.npy") if a == "E" else a for a in args]
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "imgs"), "-o", str(tmp_path / "out"), "--model",
                                       embedder, "--weights", "NONE", *args])  # fmt: skip
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
