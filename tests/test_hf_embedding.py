"""A bare Hugging Face vision encoder (``hf:`` folder of a ``ViTModel`` or ``Dinov2Model``,
loaded by ``AutoModel``) as an embedding model: its ``pooler_output`` (or, where the folder's
weights hold no pooler, its class token) compared with a reference. Every gradient and
activation method equals pytorch-grad-cam with the concept target of its embeddings
tutorial on the folder's own model and image processor, at batch sizes 1 and 3."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from clip_helpers import METHODS, assert_maps_equal, pgc_maps, read_manifest, run_camx, write_images
from conftest import write_image
from PIL import Image
from test_similarity import DifferenceFromConceptTarget, SimilarityToConceptTarget
from torch import nn

from cam_cli.cli import main

transformers = pytest.importorskip("transformers")

SIZE = 64
GRID = 4  # 64 px in 16 px patches
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
           patch_size=16)  # fmt: skip


def save_folder(folder: Path, kind: str = "vit") -> Path:
    """A tiny seeded encoder saved with ``save_pretrained`` and its image processor: ``vit``
    (``ViTModel`` with its pooler), ``vit-nopool`` (saved without one), ``dinov2``, or
    ``vit-classifier`` (a ``ViTForImageClassification``, for ``--num-classes 0``)."""
    t = transformers
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dinov2":
            model = t.Dinov2Model(t.Dinov2Config(**VIT, mlp_ratio=2))
        elif kind == "vit-classifier":
            model = t.ViTForImageClassification(t.ViTConfig(**VIT, num_labels=3))
        else:
            model = t.ViTModel(t.ViTConfig(**VIT), add_pooling_layer=kind == "vit")
        model.eval().save_pretrained(folder)
        t.ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.4, 0.5, 0.6],
                            image_std=[0.3, 0.2, 0.25]).save_pretrained(folder)  # fmt: skip
    return folder


class Embedder(nn.Module):
    """The reference: the folder's encoder loaded by transformers itself, and its embedding
    (``pooler_output``, or the class token of ``last_hidden_state``)."""

    def __init__(self, folder: Path, pooled: bool = True) -> None:
        super().__init__()
        self.encoder = transformers.AutoModel.from_pretrained(str(folder)).eval()
        self.pooled = pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.encoder(pixel_values=x)
        return output.pooler_output if self.pooled else output.last_hidden_state[:, 0]


def processed(folder: Path, paths: list[Path]) -> torch.Tensor:
    """The images as the folder's own image processor makes them."""
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    return processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]


def tokens_to_map(tensor: torch.Tensor) -> torch.Tensor:
    n, _, d = tensor.shape
    return tensor[:, 1:, :].reshape(n, GRID, GRID, d).permute(0, 3, 1, 2)


@pytest.mark.slow
@pytest.mark.parametrize(("batch", "kind"), [(1, "similar"), (3, "similar"), (3, "dissimilar")])
def test_every_method_equals_pytorch_grad_cam_on_the_pooled_output(batch: int, kind: str, tmp_path: Path) -> None:
    folder = save_folder(tmp_path / "tiny-vit")
    paths = write_images(tmp_path / "imgs", 3, SIZE)
    query = write_image(tmp_path / "query.png", SIZE, SIZE, seed=42)
    methods = [m for m in METHODS if m != "finercam"]  # one scalar: no other class to compare with
    out = tmp_path / "out"
    run_camx(tmp_path / "imgs", "-o", out, "--model", f"hf:{folder}", "--target", f"{kind}:{query}", "--method",
             ",".join(methods), "--batch-size", batch, "--device", "cpu", "-q")  # fmt: skip
    model = Embedder(folder)
    x = processed(folder, paths)
    with torch.no_grad():
        concept = model(processed(folder, [query]))[0]
        cosine = torch.nn.functional.cosine_similarity(model(x), concept[None], dim=1)
    expected = cosine if kind == "similar" else 1 - cosine
    records = read_manifest(out)
    scores = {r["key"]: r["score"] for r in records if r["method"] == "gradcam"}
    assert [scores[p.name] for p in paths] == pytest.approx(expected.tolist(), abs=1e-5)
    assert len(set(np.round(expected.numpy(), 4))) == 3, "the images must score differently"
    for record in records:  # no method's maps are flat here (equal zeros would prove nothing)
        assert np.load(out / record["map"]).max() == pytest.approx(1.0), (record["method"], record["key"])
    layers = {r["layer"] for r in records if r["layer"]}
    assert len(layers) == 1 and layers.pop().endswith(".1.layernorm_before")  # the last block's input norm
    layer = model.encoder.get_submodule(records[0]["layer"].removeprefix("model."))
    target = SimilarityToConceptTarget if kind == "similar" else DifferenceFromConceptTarget
    for method in methods:
        theirs = pgc_maps(method, model, layer, x, [target(concept)] * len(x), tokens_to_map)
        assert_maps_equal(out, method, [p.name for p in paths], theirs, [0] * len(paths))


@pytest.mark.parametrize(
    ("kind", "extra", "pooled"),
    [("dinov2", [], True), ("vit-nopool", [], False), ("vit-classifier", ["--num-classes", "0"], False)],
)
def test_the_embedding_is_the_pooled_output_or_else_the_class_token(
    kind: str, extra: list, pooled: bool, tmp_path: Path
) -> None:
    folder = save_folder(tmp_path / kind, kind)
    paths = write_images(tmp_path / "imgs", 2, SIZE)
    query = write_image(tmp_path / "query.png", SIZE, SIZE, seed=42)
    out = tmp_path / "out"
    result = run_camx(tmp_path / "imgs", "-o", out, "--model", f"hf:{folder}", *extra, "--target",
                      f"similar:{query}", "--method", "gradcam", "--device", "cpu", "--workers", "0")  # fmt: skip
    model = Embedder(folder, pooled)
    if kind == "vit-classifier":  # AutoModel reads the classifier's encoder, its head left out
        assert type(model.encoder).__name__ == "ViTModel"
    with torch.no_grad():
        concept = model(processed(folder, [query]))[0]
        cosine = torch.nn.functional.cosine_similarity(model(processed(folder, paths)), concept[None], dim=1)
    records = read_manifest(out)
    assert [r["score"] for r in records] == pytest.approx(cosine.tolist(), abs=1e-5)
    assert ("the embedding is the class token" in result.output) == (not pooled), result.output
    assert all(np.isfinite(np.load(out / r["map"])).all() for r in records)


def test_an_encoder_without_a_reference_is_refused_in_one_line(tmp_path: Path) -> None:
    folder = save_folder(tmp_path / "tiny-vit")
    write_images(tmp_path / "imgs", 1, SIZE)
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "imgs"), "-o", str(tmp_path / "out"), "--model",
                                       f"hf:{folder}", "--device", "cpu"])  # fmt: skip
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "gives embeddings, not classes" in lines[0] and "similar:REF" in lines[0], lines
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_camx_layers_takes_an_encoder_folder(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["layers", f"hf:{save_folder(tmp_path / 'tiny-vit')}"])
    assert result.exit_code == 0, result.output
    defaults = [line.split()[0] for line in result.output.splitlines() if line.rstrip().endswith("(default)")]
    assert len(defaults) == 1 and defaults[0].endswith(".1.layernorm_before"), result.output
