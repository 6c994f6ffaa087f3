"""LeGrad (``--method legrad``): torchvision's ViT against torchcam 0.5.0's ``LeGrad`` (every
block), timm's and Hugging Face's ViTs against a hand-written reference of the paper's formula
(torchcam reads torchvision's only), and the refusal of other models, through the CLI too."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_method_parity import SIZE, batch, frozen, make_bnnet, make_vit, minmax
from torch import nn

from cam_cli import rundir
from cam_cli.cli import main
from cam_cli.errors import ModelError
from cam_cli.methods import BatchExplainer, Setup, create
from cam_cli.models import Classifier
from cam_cli.probe import run_probe
from cam_cli.render import upsample_normalise


def legrad(model: nn.Module, x: torch.Tensor, ranks: int = 1, forward=None) -> tuple[np.ndarray, torch.Tensor]:  # noqa: ANN001
    """camx's finished maps ``(N, R, SIZE, SIZE)`` and the explained classes ``(N, R)``."""
    forward = forward or model
    method = create("legrad")
    method.prepare(Setup(None, None, model, forward, torch.device("cpu")))  # type: ignore[arg-type]
    result = BatchExplainer(forward, model, None, [method]).explain(x, lambda lg: lg.topk(ranks, dim=1).indices)
    maps = result.maps["legrad"]
    finished = np.stack([upsample_normalise(maps[i], SIZE, SIZE).numpy() for i in range(len(x))])
    return finished, result.classes


def finish(grid: torch.Tensor) -> np.ndarray:
    """A reference's ``(N, h, w)`` maps upsampled as camx's are, then min-max'ed."""
    up = F.interpolate(grid[:, None].detach().float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return np.stack([minmax(m) for m in up[:, 0].numpy()])


@pytest.mark.parametrize("n", [1, 4])
def test_legrad_equals_torchcams_on_torchvisions_vit(n: int) -> None:
    from torchcam.methods import LeGrad

    x = batch(n, seed=n)
    mine, classes = legrad(frozen(make_vit()), x, ranks=2)
    model = make_vit()
    for r in range(2):
        with LeGrad(model, list(model.encoder.layers)) as extractor:
            cams = extractor(classes[:, r].tolist(), model(x))[0]
        np.testing.assert_allclose(mine[:, r], finish(cams), atol=1e-4, err_msg=f"rank {r}")
    assert not any(isinstance(v, type(lambda: 0)) for v in vars(model.encoder.layers[0].self_attention).values())


def paper_legrad(blocks: list, z: torch.Tensor, attend, score, classes: torch.Tensor, grid: int) -> torch.Tensor:  # noqa: ANN001
    """The paper's formula by hand: ``mean_l mean_{heads, queries} ReLU(d s_l / d A_l)`` over the
    patch keys, ``s_l`` the head on the final norm of the mean of block ``l``'s tokens."""
    maps = []
    for block in blocks:
        z, attention = attend(block, z)
        s = score(z).gather(1, classes.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(s, attention, retain_graph=True)
        maps.append(grad.clamp(min=0).mean(dim=(1, 2))[:, 1:])
    return torch.stack(maps).mean(dim=0).reshape(len(classes), grid, grid)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    n, tokens, e = t.shape
    return t.reshape(n, tokens, heads, e // heads).transpose(1, 2)


def make_timm() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(7)
    model = VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
                              num_classes=5)  # fmt: skip
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
    return model.eval()


def timm_reference(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    def attend(block: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = block.attn
        q, k, v = (split_heads(t, a.num_heads) for t in a.qkv(block.norm1(z)).chunk(3, dim=-1))
        attention = torch.softmax(q @ k.transpose(-2, -1) * a.scale, dim=-1).detach().requires_grad_(True)
        out = a.proj((attention @ v).transpose(1, 2).reshape(z.shape))
        z = z + block.ls1(out)
        return z + block.ls2(block.mlp(block.norm2(z))), attention

    z = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    score = lambda t: model.head(model.fc_norm(model.norm(t.mean(dim=1))))  # noqa: E731
    out = z
    for block in model.blocks:
        out, _ = attend(block, out)
    torch.testing.assert_close(model.head(model.norm(out)[:, 0]), model(x))  # the hand-written forward is the model's
    return paper_legrad(list(model.blocks), z, attend, score, classes, SIZE // 8)


@pytest.mark.parametrize("n", [1, 4])
def test_legrad_on_a_timm_vit_equals_the_papers_formula_by_hand(n: int) -> None:
    model = frozen(make_timm())
    assert all(block.attn.fused_attn for block in model.blocks)  # timm's fused kernel: no attention to read
    x = batch(n, seed=n + 10)
    mine, classes = legrad(model, x)
    with torch.enable_grad():
        theirs = finish(timm_reference(make_timm(), x, classes[:, 0]))
    np.testing.assert_allclose(mine[:, 0], theirs, atol=1e-4)
    assert all(block.attn.fused_attn for block in model.blocks), "the fused kernel is put back"


def make_hf() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(9)
    config = ViTConfig(image_size=SIZE, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, num_labels=5)  # fmt: skip
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
    return model.eval()


def hf_reference(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    def attend(layer: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, h = layer.attention, layer.layernorm_before(z)
        heads = a.num_attention_heads
        q, k, v = (split_heads(p(h), heads) for p in (a.q_proj, a.k_proj, a.v_proj))
        attention = torch.softmax(q @ k.transpose(-2, -1) * a.scaling, dim=-1).detach().requires_grad_(True)
        z = z + a.o_proj((attention @ v).transpose(1, 2).reshape(z.shape))
        return z + layer.mlp(layer.layernorm_after(z)), attention

    vit = model.vit
    z = vit.embeddings(x)
    score = lambda t: model.classifier(vit.layernorm(t.mean(dim=1)))  # noqa: E731
    out = z
    for layer in vit.layers:
        out, _ = attend(layer, out)
    torch.testing.assert_close(model.classifier(vit.layernorm(out)[:, 0]), model(x).logits)
    return paper_legrad(list(vit.layers), z, attend, score, classes, SIZE // 8)


@pytest.mark.parametrize("n", [1, 4])
def test_legrad_on_a_hugging_face_vit_equals_the_papers_formula_by_hand(n: int) -> None:
    model = frozen(make_hf())
    x = batch(n, seed=n + 20)
    mine, classes = legrad(model, x, forward=lambda t: model(t).logits)
    with torch.enable_grad():
        theirs = finish(hf_reference(make_hf(), x, classes[:, 0]))
    np.testing.assert_allclose(mine[:, 0], theirs, atol=1e-4)


def test_legrad_refuses_a_cnn_in_one_line() -> None:
    model = frozen(make_bnnet())
    probe = run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE))
    with pytest.raises(ModelError, match=r"^legrad reads the attention of vision transformers .*BNNet is none") as e:
        create("legrad").prepare(Setup(probe, None, model, model, torch.device("cpu")))
    assert "\n" not in str(e.value)


def test_legrad_through_the_cli_writes_its_maps_and_refuses_a_cnn(image_dir, tiny_factory, tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "vitfactory.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_method_parity import make_vit\ndef build():\n    return make_vit()\n"
    )
    sys.modules.pop("vitfactory", None)
    out = tmp_path / "out"
    args = ["explain", str(image_dir), "-o", str(out), "--model", "vitfactory:build", "--weights", "NONE",
            "--device", "cpu", "-q", "--workers", "0", "--input-size", str(SIZE), "--batch-size", "4",
            "--method", "legrad,gradcam"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    records = rundir.load_manifest(out / "manifest.jsonl")
    keys = {key for key, _ in records}
    assert keys and all(records[(key, "legrad")]["status"] == "ok" for key in keys)
    for key in keys:
        saved = np.load(out / f"{key}.legrad.npy")
        assert saved.min() == 0.0 and saved.max() == 1.0 and (out / f"{key}.legrad.jpg").is_file()
    refused_args = [*args[:3], str(tmp_path / "out2"), "--model", tiny_factory, *args[6:-1], "legrad"]
    refused = CliRunner().invoke(main, refused_args)
    assert refused.exit_code != 0 and "legrad reads the attention of vision transformers" in refused.output
    assert not (tmp_path / "out2").exists()
