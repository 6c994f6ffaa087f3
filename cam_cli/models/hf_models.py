"""``hf:PATH`` and ``hf:ORG/NAME``: Hugging Face ``AutoModelForImageClassification``, offline;
a ``CLIPModel`` folder (:mod:`cam_cli.models.clip`); a bare vision encoder (``AutoModel``:
``ViTModel``, ``Dinov2Model``...), or any folder with ``--num-classes 0``, as an embedding
model (:mod:`cam_cli.models.embedding`).

``PATH`` is a ``save_pretrained`` folder (``config.json`` and weights);
``ORG/NAME`` is looked up in the local Hugging Face cache only.  The folder's
``config.json`` is read here first, and a config that asks for remote code
(``auto_map``) is refused before transformers, or anything in the folder, is
imported: camx never runs code from a model folder.

* ``--weights DEFAULT``: the folder's weights; ``NONE``: the folder's
  architecture with random weights; ``PATH``: a state dict loaded strictly.
* Preprocessing from the folder's ``preprocessor_config.json`` (size, mean,
  std, resample); labels from ``config.id2label``; logits from the output
  object's ``.logits``.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from cam_cli.errors import ModelError, WeightsError, one_line
from cam_cli.models.base import (
    DEFAULT_INPUT_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedModel,
    apply_state_dict,
    head_name,
    is_keyword,
    load_state_dict,
    num_classes_in,
)
from cam_cli.models.timm_models import cached_hub_file, hf_cache_dir

# PIL's resampling codes, as image processors store them
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def resolve_folder(spec: str) -> Path:
    """The model folder ``hf:SPEC`` names: a local folder, else ``ORG/NAME`` in the local cache."""
    if not spec:
        raise ModelError("--model hf: needs a folder or ORG/NAME, e.g. hf:./my-vit or hf:google/vit-base-patch16-224")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"hf:{spec}: {path} has no config.json (save the model with save_pretrained)")
        return path
    if path.exists():
        raise ModelError(f"hf:{spec}: {path} is a file; hf: takes a save_pretrained folder or ORG/NAME")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        found = cached_hub_file(spec, "config.json")
        if found is not None:
            return found.parent
        raise ModelError(
            f"hf:{spec} is not a folder and not in the local Hugging Face cache ({hf_cache_dir()}); camx does not "
            f"download: fetch it where the network is reachable (`hf download {spec}`) and copy the cache, "
            "or pass hf:PATH to a save_pretrained folder"
        )
    raise ModelError(f"hf:{spec}: no such folder")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {one_line(exc, 120)}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return data


def refuse_remote_code(folder: Path) -> dict[str, Any]:
    """``config.json`` of ``folder``, read without importing anything; refuses ``auto_map`` (remote code)."""
    config = _read_json(folder / "config.json")
    for name in ("config.json", "preprocessor_config.json"):
        data = config if name == "config.json" else None
        if data is None and (folder / name).is_file():
            data = _read_json(folder / name)
        if data and data.get("auto_map"):
            raise ModelError(
                f"refusing {folder}: its {name} asks for remote code (auto_map), and camx never runs code "
                "from a model folder; use a model that transformers ships"
            )
    return config


def import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelError("Hugging Face models need transformers: pip install 'camx[hf]'") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars on stderr, one per model
    return transformers


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _size(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in ("height", "shortest_edge", "width", "longest_edge"):
            if isinstance(value.get(key), int):
                return int(value[key])
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], int):
        return int(value[0])
    return None


def preprocessing(folder: Path, config: dict[str, Any]) -> tuple[int, tuple[float, ...], tuple[float, ...], str, list]:
    """Input size, mean, std and interpolation from the folder's image processor config."""
    notes: list[str] = []
    path = folder / "preprocessor_config.json"
    processor = _read_json(path) if path.is_file() else {}
    if not processor:
        notes.append(f"{folder} has no preprocessor_config.json: ImageNet mean/std")
    size = _size(processor.get("crop_size")) if processor.get("do_center_crop") else None
    size = size or _size(processor.get("size")) or _size(config.get("image_size")) or DEFAULT_INPUT_SIZE
    mean = tuple(float(v) for v in processor.get("image_mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in processor.get("image_std", IMAGENET_STD))
    if processor.get("do_normalize") is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    interpolation = RESAMPLE.get(processor.get("resample", 2), "bilinear")
    return int(size), mean, std, interpolation, notes


def _labels(module: nn.Module) -> list[str] | None:
    id2label = getattr(module.config, "id2label", None) or {}
    try:
        pairs = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError):
        return None
    if [k for k, _ in pairs] != list(range(len(pairs))):
        return None
    return [v for _, v in pairs] or None


def is_clip(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` describes a CLIP model (image and text towers)."""
    return config.get("model_type") == "clip" or "CLIPModel" in (config.get("architectures") or [])


def is_encoder(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` describes a bare encoder: its ``architectures`` are all base
    models (``ViTModel``, ``Dinov2Model``), none with a head (``...ForImageClassification``)."""
    names = [str(n) for n in config.get("architectures") or []]
    return bool(names) and all(n.endswith("Model") and "For" not in n for n in names)


def load_hf(
    spec: str, weights: str, num_classes: int | None, input_size: int | None = None, classes: Any = None
) -> LoadedModel:
    """Build ``hf:SPEC`` (see the module docstring)."""
    folder = resolve_folder(spec)
    config_json = refuse_remote_code(folder)  # before anything else is imported
    transformers = import_transformers()
    clip = is_clip(config_json)
    if clip and num_classes is not None:
        raise ModelError(f"hf:{spec} is a CLIP model: its classes are the prompts, not --num-classes")
    encoder = not clip and (num_classes == 0 or is_encoder(config_json))
    if encoder:
        auto = transformers.AutoModel
    else:
        auto = transformers.CLIPModel if clip else transformers.AutoModelForImageClassification
    with _offline():
        try:
            classes_asked = None if encoder else num_classes
            module, label, missing = _build(spec, folder, config_json, auto, weights.strip(), classes_asked,
                                            input_size, clip, transformers)  # fmt: skip
        except (ModelError, WeightsError):
            raise
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError... on folders it cannot use
            raise ModelError(f"cannot load hf:{spec}: {one_line(exc)}") from None
    if clip:
        from cam_cli.models.clip import hf_zero_shot

        head = hf_zero_shot(module, folder, classes, transformers)
        size, mean, std, interpolation, notes = preprocessing(folder, config_json.get("vision_config") or {})
        return LoadedModel(head, label, input_size or size, mean, std, list(classes.names), interpolation, notes,
                           prompts=list(classes.prompts))  # fmt: skip
    size, mean, std, interpolation, notes = preprocessing(folder, config_json)
    if encoder:
        from cam_cli.models.embedding import EmbeddingReadout, drop_untrained_pooler

        notes += drop_untrained_pooler(module, missing, f"hf:{spec}")
        return LoadedModel(module, label, input_size or size, mean, std, None, interpolation, notes,
                           readout=EmbeddingReadout(), embedding=True)  # fmt: skip
    if head_name(module) is None:
        raise ModelError(f"hf:{spec} has no classification head; camx needs an AutoModelForImageClassification")
    return LoadedModel(module, label, input_size or size, mean, std, _labels(module), interpolation, notes)


def _build(
    spec: str,
    folder: Path,
    config_json: dict[str, Any],
    auto: Any,
    choice: str,
    num_classes: int | None,
    input_size: int | None,
    clip: bool,
    transformers: Any,
) -> tuple[nn.Module, str, list[str]]:
    """The module of ``hf:SPEC`` with ``--weights choice``, its weights' label, and the
    names of its parameters that the folder's weights did not hold (``DEFAULT`` only)."""
    if is_keyword(choice, "DEFAULT"):
        trained = len(config_json.get("id2label") or {}) or config_json.get("num_labels")
        if num_classes is not None and trained and num_classes != int(trained):
            raise WeightsError(
                f"--num-classes {num_classes} does not match hf:{spec} ({trained} classes); "
                "pass fine-tuned weights as a path"
            )
        module, info = auto.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False,
                                            output_loading_info=True)  # fmt: skip
        return module, "DEFAULT", [str(k) for k in info.get("missing_keys", ())]
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    vision = config.vision_config if clip else config
    if input_size is not None and isinstance(getattr(vision, "image_size", None), int):
        vision.image_size = input_size
    state = None if is_keyword(choice, "NONE") else load_state_dict(Path(choice))
    if num_classes is not None:
        config.num_labels = num_classes
    module = auto.from_config(config)
    if state is not None:
        found = num_classes_in(state, module) if auto is not transformers.AutoModel else None
        if not clip and num_classes is None and found is not None and found != config.num_labels:
            config.num_labels = found
            module = auto.from_config(config)
        apply_state_dict(module, state, choice)
    return module, "NONE" if state is None else choice, []
