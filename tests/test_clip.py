"""CLIP from open_clip as a zero-shot classifier: every gradient and activation method equals
pytorch-grad-cam with a wrapper that returns the prompts' logits, on a ViT and a ResNet tower
(seeded random weights) at batch sizes 1 and 3; the text tower runs once per run; the
prompts, labels and refusals of the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from clip_helpers import METHODS, assert_maps_equal, pgc_maps, read_manifest, run_camx, tensor_of, write_images
from torch import nn
from torch.nn import functional as F

from cam_cli.cli import main

open_clip = pytest.importorskip("open_clip")

SIZE = 96
PROMPTS = ["a photo of a dog.", "a photo of a cat.", "a photo of a car.", "a photo of a tree."]
#: arch -> (default layer, how its tokens become a map for pytorch-grad-cam)
ARCHS = {"ViT-S-32": "visual.transformer.resblocks.11.ln_1", "RN50": "visual.layer4"}


class PromptLogits(nn.Module):
    """The reference's CLIP classifier: logit_scale * cos(image embedding, prompt embedding)."""

    def __init__(self, clip: nn.Module, prompts: list[str], arch: str) -> None:
        super().__init__()
        self.clip = clip
        with torch.no_grad():
            self.text = F.normalize(clip.encode_text(open_clip.get_tokenizer(arch)(prompts)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.clip.encode_image(x), dim=-1)
        return self.clip.logit_scale.exp() * image @ self.text.T


#: XGrad-CAM divides by each channel's sum over the map, sum_ij A_k. On a ViT's residual stream
#: (tokens, no ReLU) some channels sum to nearly zero over the 3x3 grid, and that division turns
#: float32 rounding (camx and pytorch-grad-cam sum in another order) into differences of about
#: 2e-4; every other method, and XGrad-CAM on the ResNet, agree to 1e-4
XGRAD_ON_TOKENS = 1e-3


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)  # camx builds --weights NONE under --seed 0
    return open_clip.create_model(arch, pretrained=None, force_image_size=SIZE).eval()


def vit_tokens(tensor: torch.Tensor) -> torch.Tensor:
    """open_clip's batch-first tokens (N, 1 + 3*3, D) without the class token, as (N, D, 3, 3)."""
    n, _, d = tensor.shape
    return tensor[:, 1:, :].reshape(n, 3, 3, d).permute(0, 3, 1, 2)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_method_equals_pytorch_grad_cam_on_prompt_logits(arch: str, batch: int, tmp_path: Path) -> None:
    paths = write_images(tmp_path / "imgs", 3, SIZE)
    out = tmp_path / "out"
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    run_camx(tmp_path / "imgs", "-o", out, "--model", f"openclip:{arch}", "--weights", "NONE", "--input-size", SIZE,
             *prompts, "--method", ",".join(METHODS), "--batch-size", batch, "-q")  # fmt: skip
    records = read_manifest(out)
    assert {r["layer"] for r in records} == {ARCHS[arch]}
    assert all(r["prompts"] == PROMPTS for r in records)
    model = PromptLogits(build(arch), PROMPTS, arch)
    x = tensor_of(paths, SIZE, model.clip.visual.preprocess_cfg["mean"], model.clip.visual.preprocess_cfg["std"],
                  "bicubic")  # fmt: skip
    with torch.no_grad():
        logits = model(x)
    classes = logits.argmax(1).tolist()
    by_key = {r["key"]: r for r in records if r["method"] == "gradcam"}
    for i, path in enumerate(paths):  # the manifest's score: the prompt's softmax probability
        assert by_key[path.name]["score"] == pytest.approx(float(logits.softmax(1)[i, classes[i]]), abs=1e-5)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = model.clip.get_submodule(ARCHS[arch])  # camx's names are open_clip's own
    reshape = vit_tokens if arch.startswith("ViT") else None
    for method in METHODS:
        targets = [ClassifierOutputTarget(c) for c in classes]
        theirs = pgc_maps(method, model, layer, x, targets, reshape)
        atol = XGRAD_ON_TOKENS if method == "xgradcam" and arch.startswith("ViT") else 1e-4
        assert_maps_equal(out, method, [p.name for p in paths], theirs, classes, atol)


def test_the_text_tower_runs_once_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    encode_text = open_clip.model.CLIP.encode_text

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(len(args[0]))
        return encode_text(self, *args, **kwargs)

    monkeypatch.setattr(open_clip.model.CLIP, "encode_text", counted)
    write_images(tmp_path / "imgs", 4, 64)
    labels = tmp_path / "labels.txt"
    labels.write_text("dog\ncat\ncar\n")
    run_camx(tmp_path / "imgs", "-o", tmp_path / "out", "--model", "openclip:ViT-S-32", "--weights", "NONE",
             "--input-size", 64, "--labels", labels, "--batch-size", 1, "--workers", 0, "-q")  # fmt: skip
    assert calls == [3], "one text-tower call for the 3 classes, not one per batch of the 4 images"
    records = read_manifest(tmp_path / "out")
    assert len(records) == 4
    assert records[0]["prompts"] == ["a photo of a dog.", "a photo of a cat.", "a photo of a car."]
    assert {r["class_name"] for r in records} <= {"dog", "cat", "car"}


def test_labels_with_a_template_and_a_class_by_name(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 2, 64)
    labels = tmp_path / "labels.txt"
    labels.write_text("dog\ncat\n")
    out = tmp_path / "out"
    run_camx(tmp_path / "imgs", "-o", out, "--model", "openclip:ViT-S-32", "--weights", "NONE", "--input-size", 64,
             "--labels", labels, "--prompt-template", "an image of a {}", "--target", "cat", "-q")  # fmt: skip
    records = read_manifest(out)
    assert [r["prompts"] for r in records] == [["an image of a dog", "an image of a cat"]] * 2
    assert {(r["class_index"], r["class_name"], r["target"]) for r in records} == {(1, "cat", "1")}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "a CLIP model classifies by text: give the classes with --labels FILE"),
        (["--prompt", "a dog", "--prompt", "a dog"], "the same prompt twice"),
        (["--prompt", "a dog", "--prompt-template", "a {}"], "--prompt gives them whole"),
    ],
)
def test_a_clip_model_without_usable_classes_is_refused_in_one_line(tmp_path: Path, extra: list, message: str) -> None:
    write_images(tmp_path / "imgs", 1, 64)
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "imgs"), "-o", str(tmp_path / "out"), "--model",
                                       "openclip:ViT-S-32", "--weights", "NONE", *extra])  # fmt: skip
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_prompts_for_a_classifier_are_refused(tmp_path: Path, tiny_factory: str) -> None:
    write_images(tmp_path / "imgs", 1, 32)
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "imgs"), "-o", str(tmp_path / "out"), "--model",
                                       tiny_factory, "--prompt", "a dog"])  # fmt: skip
    assert result.exit_code != 0
    assert "--prompt applies to CLIP models" in result.output


def test_default_weights_come_from_the_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    write_images(tmp_path / "imgs", 1, 64)
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "imgs"), "-o", str(tmp_path / "out"), "--model",
                                       "openclip:RN50", "--prompt", "a dog", "--prompt", "a cat"])  # fmt: skip
    assert result.exit_code != 0
    assert "not in the local cache" in result.output and "camx does not download" in result.output


def test_a_local_checkpoint_loads_strictly_and_resume_keeps_the_prompts(tmp_path: Path) -> None:
    model = build("ViT-S-32")
    with torch.no_grad():
        model.visual.proj.mul_(-1.0)  # weights that differ from the seeded ones
    checkpoint = tmp_path / "clip.pt"
    torch.save(model.state_dict(), checkpoint)
    write_images(tmp_path / "imgs", 2, SIZE)
    out = tmp_path / "out"
    args = [tmp_path / "imgs", "-o", out, "--model", "openclip:ViT-S-32", "--weights", checkpoint, "--input-size",
            SIZE, "--prompt", "a dog", "--prompt", "a cat", "-q", "--json"]  # fmt: skip
    run_camx(*args)
    first = read_manifest(out)
    reference = PromptLogits(model, ["a dog", "a cat"], "ViT-S-32")
    x = tensor_of(sorted((tmp_path / "imgs").iterdir()), SIZE, (0.48145466, 0.4578275, 0.40821073),
                  (0.26862954, 0.26130258, 0.27577711), "bicubic")  # fmt: skip
    with torch.no_grad():
        expected = reference(x).softmax(1).amax(1).tolist()
    assert [r["score"] for r in sorted(first, key=lambda r: r["key"])] == pytest.approx(expected, abs=1e-5)
    again = json.loads(run_camx(*args).output.strip().splitlines()[-1])
    assert again["skipped"] == 2
    other = CliRunner().invoke(main, ["explain", *[str(a) for a in args[:-2]], "--prompt", "a car"])
    assert other.exit_code != 0 and "prompts" in other.output
    assert np.isfinite(np.load(out / first[0]["map"])).all()


def test_evaluate_rebuilds_the_clip_model_from_the_recorded_prompts(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 2, 64)
    out = tmp_path / "out"
    run_camx(tmp_path / "imgs", "-o", out, "--model", "openclip:ViT-S-32", "--weights", "NONE", "--input-size", 64,
             "--prompt", "a dog", "--prompt", "a cat", "-q")  # fmt: skip
    result = CliRunner().invoke(main, ["evaluate", str(out), "-q", "--metrics", "deletion"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["status"] == "ok" for line in lines)


def test_a_sequence_first_tower_is_run_batch_first_with_the_same_outputs() -> None:
    from cam_cli.models import Classifier
    from cam_cli.models.clip import batch_first
    from cam_cli.probe import default_target, run_probe

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None, force_image_size=64).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.visual(x)
    transformer = model.visual.transformer
    transformer.batch_first = False  # OpenAI's layout: tokens (T, N, D) through every block
    for attention in transformer.modules():
        if isinstance(attention, nn.MultiheadAttention):
            attention.batch_first = False
    seen = []
    hook = transformer.resblocks[0].register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        torch.testing.assert_close(model.visual(x), expected)
    assert seen == [(5, 2, 384)], "the tokens ran sequence-first"
    batch_first(model.visual)
    with torch.no_grad():
        torch.testing.assert_close(model.visual(x), expected, atol=1e-5, rtol=1e-5)
    hook.remove()
    for p in model.parameters():
        p.requires_grad_(False)
    target = default_target(run_probe(Classifier(module=model.visual, name="m", weights="seeded", input_size=64)))
    assert (target.name, target.layout, target.grid) == ("transformer.resblocks.11.ln_1", "tokens", (2, 2))
