"""A Hugging Face CLIP folder (a tiny ``CLIPModel`` with its tokenizer and image processor,
saved with ``save_pretrained``) as a zero-shot classifier: every gradient and activation
method equals pytorch-grad-cam on the model's own ``logits_per_image``, fed by the folder's
own processor, at batch sizes 1 and 3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from clip_helpers import METHODS, assert_maps_equal, pgc_maps, read_manifest, run_camx, write_images
from PIL import Image
from torch import nn

transformers = pytest.importorskip("transformers")

SIZE = 64
PROMPTS = ["a photo of a dog", "a photo of a cat", "a red car"]


def save_tiny_clip(folder: Path) -> None:
    """A 2-layer CLIP on 64 px images (4x4 patches) with a byte-level tokenizer of 514 tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=512, eos_token_id=513, pad_token_id=513)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
                  patch_size=16)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    size = {"shortest_edge": SIZE}
    transformers.CLIPImageProcessor(size=size, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(folder)


class LogitsPerImage(nn.Module):
    """The reference: the folder's CLIPModel itself, its ``logits_per_image`` for the prompts."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.clip = transformers.CLIPModel.from_pretrained(str(folder)).eval()
        self.tokens = transformers.AutoTokenizer.from_pretrained(str(folder))(PROMPTS, padding=True,
                                                                              return_tensors="pt")  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip(**self.tokens, pixel_values=x).logits_per_image


def tokens_to_map(tensor: torch.Tensor) -> torch.Tensor:
    n, _, d = tensor.shape
    return tensor[:, 1:, :].reshape(n, 4, 4, d).permute(0, 3, 1, 2)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_every_method_equals_pytorch_grad_cam_on_logits_per_image(batch: int, tmp_path: Path) -> None:
    folder = tmp_path / "tiny-clip"
    save_tiny_clip(folder)
    paths = write_images(tmp_path / "imgs", 3, SIZE)
    out = tmp_path / "out"
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    run_camx(tmp_path / "imgs", "-o", out, "--model", f"hf:{folder}", *prompts, "--method", ",".join(METHODS),
             "--batch-size", batch, "-q")  # fmt: skip
    records = read_manifest(out)
    layer_name = "visual.vision_model.encoder.layers.1.layer_norm1"
    assert {r["layer"] for r in records} == {layer_name} and records[0]["prompts"] == PROMPTS
    model = LogitsPerImage(folder)
    processor = transformers.CLIPImageProcessor.from_pretrained(str(folder))
    x = processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(x)
    classes = logits.argmax(1).tolist()
    assert len(set(np.round(logits[0].numpy(), 4))) == len(PROMPTS), "the prompts must score differently"
    scores = {r["key"]: r["score"] for r in records if r["method"] == "gradcam"}
    for i, path in enumerate(paths):
        assert scores[path.name] == pytest.approx(float(logits.softmax(1)[i, classes[i]]), abs=1e-5)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = model.clip.get_submodule(layer_name.removeprefix("visual."))
    for method in METHODS:
        theirs = pgc_maps(method, model, layer, x, [ClassifierOutputTarget(c) for c in classes], tokens_to_map)
        assert_maps_equal(out, method, [p.name for p in paths], theirs, classes)
