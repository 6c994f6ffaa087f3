"""Score-CAM and Ablation-CAM: each of Ablation-CAM's three paths (closed form, cut,
full passes) against pytorch-grad-cam 1.5.7, top-K from the same passes, full
batches across images, the pass count, stopping between passes, a run with other
methods through the real CLI, and memory that does not grow with the folder.
(The registry-wide parity, --aug-smooth, --eigen-smooth and batch-invariance tests
in test_method_parity.py cover both methods on TinyNet, BNNet and a ViT.)"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import make_tiny, write_image
from test_method_parity import SIZE, batch, frozen, make_bnnet, make_vit, minmax, reference
from torch import nn

from cam_cli import rundir
from cam_cli.cli import main
from cam_cli.jobs.explain import ExplainConfig, Explainer
from cam_cli.methods import BatchExplainer, MethodOptions, Setup, create
from cam_cli.methods.ablation import TAIL_ROWS
from cam_cli.methods.base import Stopped
from cam_cli.models import Classifier
from cam_cli.probe import resolve_target, run_probe
from cam_cli.render import upsample_normalise

ROOT = Path(__file__).resolve().parent.parent


class SkipNet(nn.Module):
    """stem -> block, with the stem's output added back after the block (a skip connection
    that bypasses the target ``block``), then a non-linear head (no closed form)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.head(torch.flatten(self.pool(self.block(s) + s), 1))


class BranchyNet(SkipNet):
    """SkipNet with Python control flow on a tensor's value: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        if float(s.detach().mean()) > 1e9:  # never true, but only known at run time
            s = s * 2
        return self.head(torch.flatten(self.pool(self.block(s) + s), 1))


class DenseLike(nn.Module):
    """DenseNet's shape: the target's output has negative values and the model applies
    ``F.relu`` to it before GAP + linear (CAM's ``pre_activation``)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1))
        self.classifier = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.features(x)), 1), 1))


def seeded(cls: type[nn.Module], seed: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return frozen(cls().eval())


def prepared(name: str, model: nn.Module, layer: str | None = None, **options: object) -> tuple:
    probe = run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE))
    target = resolve_target(probe, layer)
    method = create(name, MethodOptions(**options))  # type: ignore[arg-type]
    method.prepare(Setup(probe, target, model, model, torch.device("cpu")))
    return method, target


def explain(name: str, model: nn.Module, x: torch.Tensor, layer: str | None = None, ranks: int = 1,
            batch_size: int = 16, forward=None) -> tuple[np.ndarray, torch.Tensor, object]:  # fmt: skip
    """Finished maps ``(N, R, SIZE, SIZE)``, the classes ``(N, R)`` and the method."""
    method, target = prepared(name, model, layer)
    explainer = BatchExplainer(forward or model, model, target, [method])
    explainer.batch_size = batch_size
    result = explainer.explain(x, lambda logits: logits.topk(ranks, dim=1).indices)
    maps = result.maps[name]
    finished = np.stack([upsample_normalise(maps[i], SIZE, SIZE).numpy() for i in range(len(x))])
    return finished, result.classes, method


class ZeroAblation(nn.Module):
    """pytorch-grad-cam's ``AblationLayer`` that always sets the channel to 0 (its own uses
    ``min - 1e7`` where the activation has negative values)."""

    def __init__(self) -> None:
        super().__init__()
        from pytorch_grad_cam.ablation_layer import AblationLayer

        self.inner = AblationLayer()

    def activations_to_be_ablated(self, activations, ratio):  # noqa: ANN001, ANN201
        return self.inner.activations_to_be_ablated(activations, ratio)

    def set_next_batch(self, input_batch_index, activations, num_channels_to_ablate):  # noqa: ANN001, ANN201
        self.inner.set_next_batch(input_batch_index, activations, num_channels_to_ablate)

    @property
    def indices(self):  # noqa: ANN201
        return self.inner.indices

    @indices.setter
    def indices(self, value) -> None:  # noqa: ANN001
        self.inner.indices = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        output = self.inner.activations
        for i in range(output.size(0)):
            output[i, self.inner.indices[i]] = 0
        return output


def pgc(name: str, model_factory, layer: str, x: torch.Tensor, classes: torch.Tensor) -> np.ndarray:  # noqa: ANN001
    """pytorch-grad-cam's maps ``(N, SIZE, SIZE)`` for ``classes`` ``(N,)``."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = model_factory().requires_grad_(True)
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    if name == "scorecam":
        cam = pytorch_grad_cam.ScoreCAM(model, [model.get_submodule(layer)])
    else:
        cam = pytorch_grad_cam.AblationCAM(model, [model.get_submodule(layer)], ablation_layer=ZeroAblation())
    with cam:
        return cam(input_tensor=x, targets=targets)


def assert_equal_to_pgc(mine: np.ndarray, theirs: np.ndarray) -> None:
    for i in range(len(theirs)):
        np.testing.assert_allclose(mine[i], minmax(theirs[i]), atol=1e-4, err_msg=f"image {i}")


MODELS = {"skip": lambda: seeded(SkipNet), "branchy": lambda: seeded(BranchyNet), "dense": lambda: seeded(DenseLike)}


@pytest.mark.parametrize("name", ["scorecam", "ablationcam"])
@pytest.mark.parametrize("key,layer,mode", [("skip", "block", "cut at block"), ("branchy", "block", "full passes"),
                                            ("dense", "features", "closed form")])  # fmt: skip
def test_each_ablation_path_and_scorecam_equal_the_reference(name: str, key: str, layer: str, mode: str) -> None:
    x = batch(3, seed=21)
    mine, classes, method = explain(name, MODELS[key](), x, layer, batch_size=4)
    if name == "ablationcam":
        assert method.settings()["ablation"].startswith(mode)
    assert_equal_to_pgc(mine[:, 0], pgc(name, MODELS[key], layer, x, classes[:, 0]))


def test_the_fallback_says_why_and_a_skip_connection_is_carried_across_the_cut() -> None:
    branchy, _ = prepared("ablationcam", MODELS["branchy"](), "block")
    assert branchy.settings()["ablation"].startswith("full passes: torch.fx cannot trace the model")
    skip, _ = prepared("ablationcam", MODELS["skip"](), "block")
    assert skip.settings()["ablation"] == "cut at block"


@pytest.mark.parametrize("key", ["skip", "branchy"])
def test_ablation_runs_the_part_before_the_target_once_per_batch_only_where_it_is_cut(key: str) -> None:
    model = MODELS[key]()
    stem_calls: list[int] = []
    model.stem[0].register_forward_hook(lambda _m, args, _o: stem_calls.append(len(args[0])))  # a leaf: fx keeps it
    forwards: list[int] = []
    counting = lambda t: (forwards.append(len(t)), model(t))[1]  # noqa: E731
    explain("ablationcam", model, batch(3), "block", batch_size=4, forward=counting)
    stem_calls = [c for c in stem_calls if c != 1]  # the probe's and the cut check's one-image passes
    k, n = 6, 3
    chunks = -(-n * k // 4)
    if key == "skip":  # the hooked pass, the prefix once, then only the part after the target per chunk
        assert stem_calls == [3, 3]
        assert len(forwards) == 2 + -(-n * k // (4 * TAIL_ROWS))
    else:  # whole passes, in full batches across images: 4, 4, 4, 4, 2
        assert stem_calls == [3] + [4] * (chunks - 1) + [n * k - 4 * (chunks - 1)]


@pytest.mark.parametrize("name", ["scorecam", "ablationcam"])
@pytest.mark.parametrize("model_key", ["bnnet", "vit"])
def test_top_k_comes_from_the_same_passes_and_equals_the_reference_per_rank(name: str, model_key: str) -> None:
    model = frozen(make_bnnet() if model_key == "bnnet" else make_vit())
    x = batch(2, seed=5)
    forwards: list[int] = []
    counting = lambda t: (forwards.append(len(t)), model(t))[1]  # noqa: E731
    mine, classes, _ = explain(name, model, x, ranks=3, batch_size=8, forward=counting)
    alone, _, _ = explain(name, model, x, ranks=1, batch_size=8)
    np.testing.assert_allclose(mine[:, 0], alone[:, 0], atol=1e-5)
    k = 12 if model_key == "bnnet" else 16
    cut = name == "ablationcam"  # both models are cut (no GAP + linear head): one prefix pass
    step = 8 * TAIL_ROWS if cut else 8
    assert len(forwards) == 1 + cut + -(-2 * k // step), "one set of passes for all three ranks"
    for r in range(3):
        theirs = reference(name, model_key, x, classes[:, r])
        assert_equal_to_pgc(mine[:, r], theirs)


def test_scorecam_batches_the_masked_images_of_several_images_together() -> None:
    model = frozen(make_tiny())
    forwards: list[int] = []
    counting = lambda t: (forwards.append(len(t)), model(t))[1]  # noqa: E731
    passes: list[int] = []
    method, target = prepared("scorecam", model)
    explainer = BatchExplainer(counting, model, target, [method])
    explainer.batch_size, explainer.on_passes = 4, passes.append
    explainer.explain(batch(3), lambda lg: lg.argmax(1, keepdim=True))
    assert forwards == [3, 4, 4, 4, 4, 2], "the hooked pass, then 18 masked images in full batches of 4"
    assert sum(passes) == 18 and explainer.extra_seconds > 0


def test_closed_form_needs_no_extra_pass_and_equals_the_reference() -> None:
    model = frozen(make_tiny())
    forwards: list[int] = []
    counting = lambda t: (forwards.append(len(t)), model(t))[1]  # noqa: E731
    x = batch(4, seed=8)
    mine, classes, method = explain("ablationcam", model, x, forward=counting)
    assert method.settings()["ablation"] == "closed form" and forwards == [4]
    assert_equal_to_pgc(mine[:, 0], pgc("ablationcam", lambda: frozen(make_tiny()), "features", x, classes[:, 0]))


@pytest.mark.parametrize("key", ["skip", "branchy", "dense"])
def test_batch_size_and_chunking_do_not_change_the_maps(key: str) -> None:
    model = MODELS[key]()
    layer = "features" if key == "dense" else "block"
    x = batch(3, seed=4)
    for name in ("scorecam", "ablationcam"):
        together, _, _ = explain(name, model, x, layer, batch_size=5)
        alone = np.concatenate([explain(name, model, x[i : i + 1], layer, batch_size=1)[0] for i in range(3)])
        # (y - y_k) / y cancels where a channel matters little: float noise of the passes
        # at other batch sizes (1e-7 relative) shows as up to ~1e-5 there
        np.testing.assert_allclose(together, alone, atol=3e-5, err_msg=name)


def test_a_stop_between_passes_raises_stopped() -> None:
    model = frozen(make_tiny())
    method, target = prepared("scorecam", model)
    explainer = BatchExplainer(model, model, target, [method])
    stop = threading.Event()
    done: list[int] = []
    explainer.batch_size, explainer.stop = 2, stop
    explainer.on_passes = lambda n: (done.append(n), stop.set())
    with pytest.raises(Stopped):
        explainer.explain(batch(2), lambda lg: lg.argmax(1, keepdim=True))
    assert done == [2], "stopped after the first chunk"


@pytest.mark.parametrize(("name", "cls"), [("scorecam", None), ("ablationcam", BranchyNet)])
def test_a_stop_mid_batch_gives_back_the_images_already_finished(name: str, cls: type[nn.Module] | None) -> None:
    model = seeded(cls) if cls is not None else frozen(make_tiny())
    x = batch(3)
    whole, _, _ = explain(name, model, x)
    method, target = prepared(name, model)
    assert method.passes_per_image == 6  # K: the target layer's channels
    explainer = BatchExplainer(model, model, target, [method])
    stop = threading.Event()
    explainer.batch_size, explainer.stop = 6, stop  # one image's passes a chunk
    explainer.on_passes = lambda n: stop.set() if n else None  # Ctrl-C during the first image's passes
    result = explainer.explain(x, lambda lg: lg.argmax(1, keepdim=True))
    assert result.stopped and len(result.logits) == len(result.classes) == result.maps[name].shape[0] == 1
    first = upsample_normalise(result.maps[name][0], SIZE, SIZE).numpy()
    np.testing.assert_allclose(first, whole[0], atol=3e-5)


def make_folder(root: Path, count: int) -> Path:
    for i in range(count):
        write_image(root / f"img{i:03d}.png", 40, 30, seed=i)
    return root


def test_an_interrupted_run_keeps_complete_batches_and_resumes_to_the_same_maps(tmp_path, tiny_factory) -> None:
    images = make_folder(tmp_path / "imgs", 6)

    def config(out: Path) -> ExplainConfig:
        return ExplainConfig(inputs=[images], out_dir=out, method="scorecam", model=tiny_factory, weights="NONE",
                             device="cpu", batch_size=2, workers=0, input_size=32)  # fmt: skip

    stop = threading.Event()
    run = Explainer(config(tmp_path / "out"))
    passes = [0]

    def count(n: int) -> None:
        passes[0] += n
        if passes[0] > 2 * 6:  # into the second batch (two images of six channels each)
            stop.set()

    summary = run.run(None, stop, on_passes=count)
    assert summary.interrupted and summary.done == 2
    assert len(rundir.load_manifest(tmp_path / "out" / "manifest.jsonl")) == 2
    assert summary.timings["extra_passes"] > 0
    resumed = Explainer(config(tmp_path / "out")).run()
    assert resumed.done == 4 and resumed.skipped == 2
    Explainer(config(tmp_path / "whole")).run()
    for i in range(6):
        key = f"img{i:03d}.png"
        np.testing.assert_allclose(np.load(tmp_path / "out" / f"{key}.scorecam.npy"),
                                   np.load(tmp_path / "whole" / f"{key}.scorecam.npy"), atol=1e-6)  # fmt: skip


def test_with_other_methods_through_the_cli(image_dir, tiny_factory, tmp_path) -> None:
    args = ["--model", tiny_factory, "--weights", "NONE", "--device", "cpu", "-q", "--json", "--workers", "0",
            "--input-size", "32"]  # fmt: skip
    result = CliRunner().invoke(main, ["explain", str(image_dir), "-o", str(tmp_path / "all"), *args,
                                       "--method", "gradcam,scorecam,ablationcam", "--target", "top2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["done"] == 6 and summary["timings"]["extra_passes"] > 0
    records = rundir.load_manifest(tmp_path / "all" / "manifest.jsonl")
    assert len(records) == 18
    assert records[("a.jpg", "ablationcam.top2")]["ablation"] == "closed form"
    assert [t["rank"] for t in records[("a.jpg", "scorecam.top2")]["targets"]] == [1, 2]
    alone = CliRunner().invoke(main, ["explain", str(image_dir), "-o", str(tmp_path / "one"), *args,
                                      "--method", "scorecam", "--target", "top2"])  # fmt: skip
    assert alone.exit_code == 0, alone.output
    for rank in (1, 2):
        np.testing.assert_allclose(np.load(tmp_path / "all" / f"a.jpg.scorecam.top{rank}.npy"),
                                   np.load(tmp_path / "one" / f"a.jpg.scorecam.top{rank}.npy"), atol=1e-6)  # fmt: skip


def test_methods_lists_the_cost_per_image() -> None:
    result = CliRunner().invoke(main, ["methods", "--json"])
    rows = {r["name"]: r for r in map(json.loads, result.output.splitlines())}
    assert rows["scorecam"]["forwards_note"] == "1+K" and rows["ablationcam"]["family"] == "perturbation"
    assert rows["gradcam"]["forwards_note"] is None
    table = CliRunner().invoke(main, ["methods"]).output
    assert "K = the target layer's channels" in table


PEAK = """
import resource, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from cam_cli.jobs.explain import ExplainConfig, explain
summary = explain(ExplainConfig(inputs=[Path(sys.argv[1])], out_dir=Path(sys.argv[2]), method="scorecam",
                  model="tinynet_module:build", weights="NONE", device="cpu", batch_size=16, workers=0, input_size=64))
assert summary.done == int(sys.argv[3]), summary
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_memory_does_not_grow_with_the_folder(tmp_path, tiny_factory) -> None:
    peaks = {}
    for count in (20, 200):
        folder = make_folder(tmp_path / f"in{count}", count)
        done = subprocess.run(
            [sys.executable, "-c", PEAK.format(tests=str(ROOT / "tests")), str(folder), str(tmp_path / f"o{count}"),
             str(count)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        peaks[count] = int(done.stdout.split()[-1])  # KiB
    assert peaks[200] <= peaks[20] * 1.05 + 8 * 1024, peaks


def test_a_target_layer_given_as_a_module_input_is_ablated_there() -> None:
    model = MODELS["skip"]()
    x = batch(2, seed=6)
    mine, classes, method = explain("ablationcam", model, x, "pool:input")
    assert method.settings()["ablation"] == "cut at pool:input"
    # pool's input is block(s) + s: ablating it equals ablating the output of an identity placed there
    theirs = pgc("ablationcam", lambda: seeded(SkipWithIdentity), "join", x, classes[:, 0])
    assert_equal_to_pgc(mine[:, 0], theirs)


class SkipWithIdentity(SkipNet):
    """SkipNet with an identity module on the sum, so the reference can ablate it."""

    def __init__(self) -> None:
        super().__init__()
        self.join = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.head(torch.flatten(self.pool(self.join(self.block(s) + s)), 1))


def test_scorecam_runs_its_masked_passes_with_batch_norms_folded_and_still_equals_the_reference() -> None:
    method, _ = prepared("scorecam", frozen(make_bnnet()))
    assert method.folded is not None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in method.folded.modules())
    assert prepared("scorecam", frozen(make_tiny()))[0].folded is None  # nothing to fold
    x = batch(2, seed=12)
    folded_calls: list[int] = []
    method.folded.register_forward_hook(lambda _m, args, _o: folded_calls.append(len(args[0])))
    explainer = BatchExplainer(method.module, method.module, target_of_bnnet(method.module), [method])
    result = explainer.explain(x, lambda lg: lg.argmax(1, keepdim=True))
    assert sum(folded_calls) == 2 * 12, "every masked image went through the folded copy"
    mine = np.stack([upsample_normalise(result.maps["scorecam"][i], SIZE, SIZE)[0].numpy() for i in range(2)])
    assert_equal_to_pgc(mine, reference("scorecam", "bnnet", x, result.classes[:, 0]))


def target_of_bnnet(model: nn.Module):  # noqa: ANN201
    return resolve_target(run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE)), None)


class ChannelsLastNet(nn.Module):
    """A Swin-like layout: the target (LayerNorm) gives ``(N, h, w, C)``; a non-linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 4, stride=4)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.stem(x).permute(0, 2, 3, 1)).mean(dim=(1, 2)))


class ZeroAblationLast(ZeroAblation):
    """``ZeroAblation`` along the last axis (channels of an ``(N, h, w, C)`` activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        output = self.inner.activations
        for i in range(output.size(0)):
            output[i, ..., self.inner.indices[i]] = 0
        return output


@pytest.mark.parametrize("name", ["scorecam", "ablationcam"])
def test_a_channels_last_layer_equals_the_reference(name: str) -> None:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = batch(2, seed=14)
    mine, classes, method = explain(name, seeded(ChannelsLastNet), x, "norm", batch_size=4)
    probe = run_probe(Classifier(module=seeded(ChannelsLastNet), name="m", weights="seeded", input_size=SIZE))
    assert resolve_target(probe, "norm").layout == "nhwc"
    if name == "ablationcam":
        assert method.settings()["ablation"] == "cut at norm"
    model = seeded(ChannelsLastNet).requires_grad_(True)
    kwargs = {"ablation_layer": ZeroAblationLast()} if name == "ablationcam" else {}
    cls = pytorch_grad_cam.ScoreCAM if name == "scorecam" else pytorch_grad_cam.AblationCAM
    with cls(model, [model.norm], reshape_transform=lambda t: t.permute(0, 3, 1, 2), **kwargs) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes[:, 0]])
    assert_equal_to_pgc(mine[:, 0], theirs)


def test_start_up_runs_no_masked_passes_even_where_a_dry_run_is_needed(tmp_path, tiny_factory, monkeypatch) -> None:
    import cam_cli.methods.perturbation as perturbation

    images = make_folder(tmp_path / "imgs", 2)
    calls: list[int] = []
    real = perturbation.masked_scores
    monkeypatch.setattr(perturbation, "masked_scores", lambda capture: (calls.append(1), real(capture))[1])
    config = ExplainConfig(inputs=[images], out_dir=tmp_path / "out", method="shapleycam,scorecam",
                           model=tiny_factory, weights="NONE", device="cpu", workers=0, input_size=32)  # fmt: skip
    run = Explainer(config)  # shapleycam is not vouched for by the probe: a dry run
    assert calls == []
    assert run.run().done == 2 and calls == [1]


def test_smoothing_options_through_the_cli_are_recorded(image_dir, tiny_factory, tmp_path) -> None:
    args = ["--model", tiny_factory, "--weights", "NONE", "--device", "cpu", "-q", "--json", "--workers", "0",
            "--input-size", "32", "--method", "scorecam,ablationcam", "--aug-smooth", "--eigen-smooth"]  # fmt: skip
    result = CliRunner().invoke(main, ["explain", str(image_dir), "-o", str(tmp_path / "o"), *args])
    assert result.exit_code == 0, result.output
    records = rundir.load_manifest(tmp_path / "o" / "manifest.jsonl")
    for method in ("scorecam", "ablationcam"):
        record = records[("a.jpg", method)]
        assert record["status"] == "ok" and record["aug_smooth"] is True and record["eigen_smooth"] is True
        assert np.load(tmp_path / "o" / f"a.jpg.{method}.npy").max() == 1.0
