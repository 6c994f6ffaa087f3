"""One budget guard for every costly metric (``cam_cli.metrics.budget``): the faithfulness
metrics at the references' budgets and the metrics that explain again (MPRT with a
Score-CAM of 128 channels) are refused in one line of one style, before anything is
written, and run with ``--budget-ok``; and the forward passes evaluate reports for the
metrics that explain again are the passes the model made."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_image

from cam_cli import rundir
from cam_cli.cli import main
from cam_cli.metrics.budget import over_budget, passes_per_map
from cam_cli.metrics.options import MetricOptions

SIZE = 32
FAST = ["--device", "cpu", "--workers", "0"]
#: the one style of every refusal
REFUSAL = re.compile(
    r"camx: error: (?P<name>[a-z-]+) would take (?P<cost>[\d,]+) forward passes per 32x32 map, \d+x "
    r"deletion/insertion's 39 at --steps 20 \(more than 10x\): (.+, or )?pass --budget-ok to run it anyway"
)


@pytest.fixture
def wide_factory(tiny_factory: str, tmp_path: Path) -> str:
    """``--model wide128:build``: the tiny CNN with 128 channels (Score-CAM: 128 passes an image)."""
    (tmp_path / "wide128.py").write_text(
        f"import sys, torch\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import TinyNet\ndef build():\n"
        "    torch.manual_seed(0)\n    return TinyNet(5, channels=128).eval()\n"
    )
    sys.modules.pop("wide128", None)
    return "wide128:build"


def explain_run(tmp_path: Path, model: str, methods: str, images: int = 2) -> Path:
    for i in range(images):
        write_image(tmp_path / "imgs" / f"{i}.png", 40 + 8 * i, 36, seed=i)
    out = tmp_path / "out"
    args = ["explain", str(tmp_path / "imgs"), "-o", str(out), "--model", model, "--method", methods]
    result = CliRunner().invoke(main, [*args, "--input-size", str(SIZE), *FAST, "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def evaluate(out: Path, *args: str) -> tuple[int, dict, str]:
    result = CliRunner().invoke(main, ["evaluate", str(out), *FAST, "--json", *args], catch_exceptions=False)
    payload = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    return result.exit_code, payload, result.stderr


@pytest.mark.slow
def test_faithfulness_and_randomisation_defaults_are_refused_alike_unless_budget_ok(wide_factory: str,
                                                                                   tmp_path: Path) -> None:  # fmt: skip
    out = explain_run(tmp_path, wide_factory, "scorecam")
    refused = {}
    for metric in ("pixel-flipping", "mprt"):
        code, payload, stderr = evaluate(out, "--metrics", metric)
        assert code == 1 and payload["exit_status"] == 1, stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
        match = REFUSAL.fullmatch(stderr.strip())
        assert match is not None and match["name"] == metric, stderr
        refused[metric] = int(match["cost"].replace(",", ""))
        assert not (out / "metrics.jsonl").exists()  # refused before anything is written
    assert refused["pixel-flipping"] == SIZE * SIZE  # one pixel a step
    assert refused["mprt"] == 4 * (1 + 128)  # the trained model and 3 blocks, each 1 + 128 passes
    code, payload, stderr = evaluate(out, "--metrics", "pixel-flipping,mprt", "--budget-ok")
    assert code == 0, stderr
    assert payload["done"] == 2 and "pixel_flipping_auc" in payload["summary"]["methods"]["scorecam"]["metrics"]
    # every pass: pixel flipping's 1 + 1024 per map, Score-CAM's 1 + 128 per explain, 4 explains per image
    assert payload["forward_passes"] == 2 * (1 + SIZE * SIZE) + 2 * 4 * (1 + 128)


@pytest.mark.slow
def test_the_forward_passes_of_mprt_and_random_logit_are_counted(tiny_factory: str, tmp_path: Path) -> None:
    out = explain_run(tmp_path, tiny_factory, "gradcam,gradcam++", images=3)
    code, payload, stderr = evaluate(out, "--metrics", "mprt")
    assert code == 0, stderr
    blocks = list(rundir.read_records(out / "metrics.jsonl"))[0]["mprt_blocks"]
    assert len(blocks) == 3
    # each image once per depth, both methods from the same pass (one forward each)
    assert payload["forward_passes"] == 3 * (1 + len(blocks))
    assert payload["forward_batches"] == 1 + len(blocks)  # the three images in one batch
    code, payload, stderr = evaluate(out, "--metrics", "mprt,random-logit,deletion", "--steps", "4")
    assert code == 0 and payload["done"] == 6, stderr
    # mprt's values hold; random-logit explains each image again for its class, then each
    # distinct (image, other class) once; deletion: the image, the all-zero one and 3 steps a line
    lines = rundir.load_manifest(out / "metrics.jsonl").values()
    rows = {(line["key"], line["random_logit_class"]) for line in lines}
    assert payload["forward_passes"] == 3 + len(rows) + 6 * (1 + 1 + 3)


def test_one_guard_for_every_metric() -> None:
    options = MetricOptions()
    assert passes_per_map("mprt", options, 224, explain_cost=3, blocks=21) == 66
    assert passes_per_map("random-logit", options, 224, explain_cost=3) == 6
    assert passes_per_map("arcc", options, 224, explain_cost=3) == 3 + 8
    assert passes_per_map("confidence", options, 224, explain_cost=3) is None
    message = over_budget(["deletion", "random-logit", "mprt"], options, 224, explain_cost=1281 / 2, blocks=21)
    assert message is not None and message.startswith("random-logit would take 1,281 forward passes per 224x224 map")
    assert message.endswith("evaluate a run of fewer or cheaper methods, or pass --budget-ok to run it anyway")
    assert over_budget(["mprt", "random-logit", "arcc"], options, 224, explain_cost=3, blocks=21) is None
