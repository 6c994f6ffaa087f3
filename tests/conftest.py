"""Shared fixtures: a seeded tiny model, folders of real image files, an isolated TORCH_HOME."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_images"


class TinyNet(nn.Module):
    """Conv -> ReLU -> Conv -> ReLU -> GAP -> Linear: CAM applies at ``features``."""

    def __init__(self, num_classes: int = 5, channels: int = 6) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def make_tiny(seed: int = 0, num_classes: int = 5) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet(num_classes).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture
def tiny_model() -> TinyNet:
    return make_tiny()


def write_image(path: Path, width: int, height: int, seed: int = 0, fmt: str | None = None) -> Path:
    """A smooth random colour image (compresses like a photo) saved to ``path``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Six images of odd sizes and formats, one in a subfolder."""
    root = tmp_path / "imgs"
    write_image(root / "a.jpg", 67, 45, 1)
    write_image(root / "b.png", 40, 71, 2)
    write_image(root / "c.bmp", 33, 33, 3)
    write_image(root / "sub" / "d.jpeg", 90, 50, 4)
    write_image(root / "sub" / "e.webp", 52, 38, 5)
    write_image(root / "f.tif", 48, 64, 6)
    return root


@pytest.fixture
def sample_dir(tmp_path: Path) -> Path:
    """A copy of the committed sample photographs."""
    target = tmp_path / "samples"
    target.mkdir()
    for photo in sorted(SAMPLES.glob("*.jpg")):
        shutil.copy(photo, target / photo.name)
    return target


@pytest.fixture(autouse=True)
def torch_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty TORCH_HOME and no network for weight downloads."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    # A closed local port: any attempt to download weights fails at once.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def tiny_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``--model tinynet_module:build`` importable from the working directory."""
    (tmp_path / "tinynet_module.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import make_tiny\n"
        "def build():\n"
        "    return make_tiny()\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tinynet_module", None)
    return "tinynet_module:build"


@pytest.fixture
def positive_factory(tiny_factory: str, tmp_path: Path) -> str:
    """``--model positive_head:build``: the tiny model with every weight of its linear head
    made positive, so that CAM's map is never negative and equals Grad-CAM's (a GAP +
    linear head gives Grad-CAM the head's weights, up to a positive factor)."""
    (tmp_path / "positive_head.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import make_tiny\n"
        "def build():\n"
        "    model = make_tiny()\n"
        "    model.fc.weight.abs_()\n"
        "    return model\n"
    )
    sys.modules.pop("positive_head", None)
    return "positive_head:build"


def camx_script() -> str:
    """The installed console script beside this interpreter."""
    script = Path(sys.executable).parent / "camx"
    assert script.exists(), f"camx console script not installed next to {sys.executable}"
    return str(script)


os.environ.setdefault("OMP_NUM_THREADS", "2")
# A suite started in the background (`make test &`) has SIGINT ignored, and the camx processes the
# tests start and interrupt would inherit that: give them the default back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
