"""What every model source shares: the ``Classifier`` they all return, reading
logits out of a model's output, labels, and reading weights files safely."""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cam_cli.errors import ModelError, WeightsError, one_line

if TYPE_CHECKING:
    from cam_cli.models.readout import Readout

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = 224
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass
class Classifier:
    """A frozen classifier and what it needs to be fed and read.

    ``module`` maps ``(N, 3, S, S)`` normalised images to logits ``(N, C)``
    (through ``logits``, which also takes the logits out of tuple, dict or
    output-object outputs).  ``categories`` are the class names when known;
    ``interpolation`` is how the whole image is resized to ``S x S``. ``readout`` turns
    the model's output into the targets maps explain (:mod:`cam_cli.models.readout`;
    by default the logits, read with ``output_key``), and names the model's task.
    """

    module: nn.Module
    name: str
    weights: str
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    categories: list[str] | None = None
    output_key: str | None = None
    notes: list[str] = field(default_factory=list)
    interpolation: str = "bilinear"
    #: a zero-shot CLIP model's text prompt of each class (None: a classifier with its own head)
    prompts: list[str] | None = None
    readout: Readout | None = None
    #: the module gives embeddings, not logits (``--num-classes 0``, a bare encoder): explained by similarity
    embedding: bool = False

    def __post_init__(self) -> None:
        if self.readout is None:
            from cam_cli.models.readout import Readout

            self.readout = Readout(self.output_key)

    @property
    def task(self) -> str:
        return self.readout.task if self.readout is not None else "classification"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The targets ``(N, T)`` of batch ``x``: a classifier's logits, or what its readout reads."""
        assert self.readout is not None
        return self.readout.read(self.module, x)

    def class_name(self, index: int) -> str | None:
        if self.categories is not None and 0 <= index < len(self.categories):
            return self.categories[index]
        return None


@dataclass
class LoadedModel:
    """What a source hands back before camx freezes the module and applies the overrides."""

    module: nn.Module
    weights: str
    input_size: int = DEFAULT_INPUT_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    categories: list[str] | None = None
    interpolation: str = "bilinear"
    notes: list[str] = field(default_factory=list)
    #: a zero-shot CLIP model's prompts, one per class
    prompts: list[str] | None = None
    #: the targets of a model that is not a classifier (segmentation); None: the logits
    readout: Readout | None = None
    #: the module gives embeddings, not logits (a bare Hugging Face encoder)
    embedding: bool = False


def extract_logits(output: Any, key: str | None = None) -> torch.Tensor:
    """The logits tensor of a model's output.

    A tensor is the logits (``--output-key`` does not apply to it); a dict
    (Hugging Face's ``ModelOutput`` is one) needs ``key`` unless it has a
    ``logits`` entry; an object with a ``.logits`` tensor (Inception's
    ``InceptionOutputs``) gives that; a tuple or list with one tensor gives it,
    and with several needs ``key`` as an index.
    """
    if isinstance(output, torch.Tensor):
        if key is not None:
            raise ModelError(f"--output-key {key}: the model returns a single tensor, not a dict or tuple")
        return output
    if isinstance(output, dict):
        chosen = key if key is not None else ("logits" if "logits" in output else None)
        if chosen is None or chosen not in output:
            raise ModelError(f"the model returns a dict with keys {sorted(output)}; name the logits with --output-key")
        return extract_logits(output[chosen])
    if key is None and hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        if key is None:
            tensors = [item for item in output if isinstance(item, torch.Tensor)]
            if len(output) == 1 or len(tensors) == 1:
                return extract_logits(tensors[0] if tensors else output[0])
            raise ModelError(
                f"the model returns a {type(output).__name__} of {len(output)} outputs; "
                f"say which holds the logits with --output-key 0..{len(output) - 1}"
            )
        if not key.lstrip("-").isdigit() or not -len(output) <= int(key) < len(output):
            raise ModelError(
                f"--output-key {key}: the model returns a {type(output).__name__} of {len(output)} outputs; "
                f"use an index 0..{len(output) - 1}"
            )
        return extract_logits(output[int(key)])
    raise ModelError(f"the model returns {type(output).__name__}, not logits")


def imagenet_categories() -> list[str]:
    """The 1,000 ImageNet class names, as torchvision ships them."""
    import torchvision

    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def read_labels(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read labels file {path}: {exc}") from None
    labels = [line.strip() for line in lines if line.strip()]
    if not labels:
        raise ModelError(f"labels file {path} has no class names")
    return labels


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Make every ``torch.load`` inside (torchvision's and timm's included) use ``weights_only=True``."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random initialisation inside is seeded with ``seed``; the global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def checkpoint_dir() -> Path:
    """Where torchvision caches downloaded weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def unreadable(path: Path, exc: BaseException) -> str:
    """Why ``torch.load`` could not read ``path``, in a few words."""
    with contextlib.suppress(OSError):
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    text = " ".join(str(exc).split())
    if isinstance(exc, (EOFError, zipfile.BadZipFile)) or "central directory" in text or "zip archive" in text:
        return "not a complete PyTorch checkpoint (truncated or damaged)"
    if isinstance(exc, (KeyError, IndexError, TypeError, AttributeError)) or not text:
        return "not a PyTorch checkpoint"
    first = text.split(". ")[0]
    return first if len(first) <= 200 else first[:197] + "..."


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsError(f"reading {path} needs safetensors: pip install safetensors (or 'camx[hf]')") from None
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {path}") from None
    except Exception as exc:  # safetensors raises its own SafetensorError on junk
        reason = "empty file (0 bytes)" if path.exists() and path.stat().st_size == 0 else one_line(exc, 120)
        raise WeightsError(f"cannot read weights {path}: not a readable safetensors file ({reason})") from None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path``: ``.safetensors``, or ``torch.load`` with ``weights_only=True``.

    Accepts a bare state dict or one under ``state_dict``/``model``; strips the
    ``module.`` prefix that DataParallel and DDP add.
    """
    if path.suffix == ".safetensors":
        obj: Any = _load_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise WeightsError(f"weights file not found: {path}") from None
        except pickle.UnpicklingError as exc:
            if "unsupported global" not in str(exc).lower():  # junk, not a pickle of objects
                raise WeightsError(f"cannot read weights {path}: not a PyTorch checkpoint") from None
            raise WeightsError(
                f"refusing to load {path}: it holds objects other than tensors, and loading it could run "
                "code (torch.load with weights_only=True rejected it)"
            ) from None
        except Exception as exc:  # torch.load fails in many ways on files that are not checkpoints
            raise WeightsError(f"cannot read weights {path}: {unreadable(path, exc)}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def head_name(module: nn.Module) -> str | None:
    """Name of the last ``nn.Linear`` (or 1x1 conv classifier) in the module tree."""
    last = None
    for name, child in module.named_modules():
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            last = name
    return last


def num_classes_in(state: dict[str, torch.Tensor], module: nn.Module) -> int | None:
    head = head_name(module)
    if head is None:
        return None
    weight = state.get(f"{head}.weight")
    return int(weight.shape[0]) if weight is not None else None


def apply_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)``: every tensor must fit, the head included."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise WeightsError(f"weights {source} do not fit the model: {detail}") from None


def looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.endswith((".pth", ".pt", ".bin", ".ckpt", ".safetensors")) or Path(spec).exists()


def is_keyword(spec: str, word: str) -> bool:
    return spec.strip().upper() == word
