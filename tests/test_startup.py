"""What start-up does and skips: the probe's deferred backward pass, the dry run
that only a method the probe cannot vouch for gets, and channels-last with its
fallback for models that fail in it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cam_cli import rundir
from cam_cli.cli import main
from cam_cli.jobs.explain import ExplainConfig
from cam_cli.jobs.explain.session import open_session
from cam_cli.models import Classifier
from cam_cli.probe import default_target, run_probe

MODELS = '''
import torch
from torch import nn


class SideBranch(nn.Module):
    """A feature map that reaches the logits, and a side branch that is computed but never used."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.aux = nn.Conv2d(6, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        a = self.features(x)
        self.aux(a)
        return self.fc(torch.flatten(self.pool(a), 1))


class FlatView(nn.Module):
    """Flattens its feature map with ``view``, which a channels-last tensor refuses."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


def side_branch():
    torch.manual_seed(0)
    return SideBranch().eval()


def flat_view():
    torch.manual_seed(0)
    return FlatView().eval()
'''


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The module name of the models above, importable as ``--model NAME:factory``."""
    (tmp_path / "startup_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("startup_models", None)
    return "startup_models"


def _probe(models: str, factory: str, size: int = 16):
    module = getattr(__import__(models), factory)()
    for p in module.parameters():
        p.requires_grad_(False)
    return run_probe(Classifier(module=module, name=factory, weights="seeded", input_size=size))


def test_probe_defers_its_backward_and_finds_what_it_reaches_without_it(models) -> None:
    probe = _probe(models, "side_branch")
    assert default_target(probe).name == "features"
    assert probe.root is not None  # a pooled CNN's default target needs no backward pass
    features, aux = probe.find("features"), probe.find("aux")
    assert probe.reaches(features) and not probe.reaches(aux)
    conv = probe.find("features.0")
    assert probe.root is not None and conv.tensor.grad is None  # only the part after the feature map ran
    probe.backward()
    assert probe.root is None
    assert conv.tensor.grad is not None and aux.tensor.grad is None
    assert probe.reaches(features) and not probe.reaches(aux)  # the same answers from the gradients


def test_token_models_still_get_the_backward_pass_that_finds_their_patch_tokens() -> None:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32).eval()
    probe = run_probe(Classifier(module=vit, name="vit", weights="random", input_size=32))
    target = default_target(probe)
    assert probe.root is None  # the backward ran: the tokens that reach the head are read from it
    assert target.layout == "tokens" and target.name.startswith("encoder.layers")


def _config(tmp_path: Path, model: str, **kwargs) -> ExplainConfig:
    from conftest import write_image

    images = tmp_path / "imgs"
    for i, (w, h) in enumerate([(40, 30), (23, 37)]):
        write_image(images / f"im{i}.png", w, h, seed=i)
    return ExplainConfig(inputs=[images], out_dir=tmp_path / "out", model=model, weights="NONE", device="cpu",
                         workers=0, input_size=16, **kwargs)  # fmt: skip


def test_the_dry_run_is_left_out_only_where_the_probe_vouches_for_the_layer(tmp_path, models, monkeypatch) -> None:
    import cam_cli.jobs.explain.session as session

    runs: list[set] = []
    real = session.dry_run
    monkeypatch.setattr(session, "dry_run", lambda e, x, t: (runs.append(1), real(e, x, t))[1])
    open_session(_config(tmp_path, f"{models}:side_branch", method="gradcam,layercam,eigencam"))
    assert runs == []
    open_session(_config(tmp_path, f"{models}:side_branch", method="shapleycam"))
    assert runs == [1]  # a Hessian-vector product: the probe does not show that it runs


def test_a_layer_the_logits_do_not_depend_on_is_refused_before_anything_is_written(tmp_path, models) -> None:
    from conftest import write_image

    write_image(tmp_path / "imgs" / "a.png", 30, 20)
    out = tmp_path / "out"
    args = ["explain", str(tmp_path / "imgs"), "-o", str(out), "--model", f"{models}:side_branch", "--weights",
            "NONE", "--device", "cpu", "--workers", "0", "--input-size", "16", "--layer", "aux"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    message = result.output.strip()
    assert message.startswith("camx: error:") and "gradcam" in message and "\n" not in message
    assert not out.exists() or not any(out.iterdir())


def test_a_model_that_fails_in_channels_last_runs_in_the_default_format(tmp_path, models, monkeypatch) -> None:
    flat = f"{models}:flat_view"
    assert not open_session(_config(tmp_path, flat)).channels_last
    assert open_session(_config(tmp_path, f"{models}:side_branch")).channels_last
    runner = CliRunner()
    common = ["--model", flat, "--weights", "NONE", "--device", "cpu", "--workers", "0", "--input-size", "16", "-q",
              "--method", "gradcam,eigencam"]  # fmt: skip
    _config(tmp_path, flat)  # writes the images
    for name, env in (("cl", "1"), ("nchw", "0")):
        monkeypatch.setenv("CAMX_CHANNELS_LAST", env)
        result = runner.invoke(main, ["explain", str(tmp_path / "imgs"), "-o", str(tmp_path / name), *common])
        assert result.exit_code == 0, result.output
    records = rundir.load_manifest(tmp_path / "cl" / "manifest.jsonl")
    assert {r["status"] for r in records.values()} == {"ok"} and len(records) == 4
    for key in ("im0.png", "im1.png"):
        for method in ("gradcam", "eigencam"):
            mine = np.load(tmp_path / "cl" / f"{key}.{method}.npy")
            assert mine.max() == 1.0
            np.testing.assert_allclose(mine, np.load(tmp_path / "nchw" / f"{key}.{method}.npy"), atol=1e-5)


def test_the_console_script_exits_with_every_output_written_and_its_status(tmp_path) -> None:
    """``camx`` leaves out the interpreter's teardown: what it prints to a pipe, the
    manifest and the exit status are all there as they would be otherwise."""
    import json
    import subprocess

    from conftest import camx_script, write_image

    images = tmp_path / "imgs"
    for i in range(3):
        write_image(images / f"ok{i}.png", 40 + i, 30)
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    args = [camx_script(), "explain", str(images), "-o", str(out), "--model", "resnet18", "--weights", "NONE",
            "--device", "cpu", "--input-size", "64", "--batch-size", "2", "--workers", "1", "--json",
            "--method", "gradcam,eigencam"]  # fmt: skip
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stderr  # an input failed
    summary = json.loads(run.stdout)
    assert (summary["done"], summary["failed"]) == (3, 1)
    assert "camx: 4 images: 3 done, 1 failed" in run.stderr
    records = rundir.load_manifest(out / "manifest.jsonl")
    assert len(records) == 8 and sum(r["status"] == "ok" for r in records.values()) == 6
    assert not rundir.journal_path(out / "manifest.jsonl").exists()  # folded into the manifest
    for i in range(3):
        assert np.load(out / f"ok{i}.png.gradcam.npy").shape == (30, 40 + i)
