"""``timm:NAME``: any timm classification architecture, offline.

* ``--weights NONE``: random initialisation (seeded by the caller);
* ``--weights PATH``: a ``.safetensors``, ``.pth`` or ``.bin`` state dict, read
  weights-only and loaded strictly; the number of classes is read from the
  checkpoint's classifier unless ``--num-classes`` says it;
* ``--weights DEFAULT``: timm's pretrained weights for NAME (``NAME.TAG`` picks
  a tag), from the local Hugging Face cache (or torch.hub's, for weights timm
  downloads from a URL) only; nothing is downloaded.

timm's own loader drops a classifier of the wrong size without a word; here a
head that does not fit is an error.  Preprocessing comes from the model's
``pretrained_cfg`` through ``timm.data.resolve_data_config``: input size, mean,
std and interpolation (camx still resizes the whole image, with no crop).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from cam_cli.errors import ModelError, WeightsError, one_line, suggest
from cam_cli.models.base import (
    DEFAULT_INPUT_SIZE,
    INTERPOLATIONS,
    LoadedModel,
    apply_state_dict,
    checkpoint_dir,
    imagenet_categories,
    is_keyword,
    load_state_dict,
    weights_only_loading,
)

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ModelError("timm models need timm: pip install 'camx[timm]'") from None
    return timm


@functools.lru_cache(maxsize=1)
def timm_names() -> list[str]:
    """Every architecture timm registers (``timm.list_models()``)."""
    return list(import_timm().list_models())


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` finds it now (``HF_HUB_CACHE``, ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(home) / "hub"


def cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of ``repo_id`` in the local Hugging Face cache, or None; never the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()))
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def _pretrained_cfg(name: str) -> Any:
    timm = import_timm()
    arch, tag = timm.models.split_model_name_tag(name)
    if tag:
        tags = timm.models.get_arch_pretrained_cfgs(arch)
        if name not in tags:
            known = ", ".join(sorted(tags)) or "none"
            raise WeightsError(f"timm has no pretrained tag {tag!r} for {arch}; its tags: {known}")
    return timm.models.get_pretrained_cfg(name)


def _cached_weights(name: str, cfg: Any) -> Path:
    """The file timm's pretrained weights for ``name`` would be loaded from, found offline."""
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        files = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else HF_WEIGHT_FILES
        for filename in files:
            found = cached_hub_file(hub_id, filename)
            if found is not None:
                return found
        raise WeightsError(
            f"timm:{name} DEFAULT weights are not in the local Hugging Face cache ({hf_cache_dir()}): put "
            f"{files[0]} of https://huggingface.co/{hub_id} there (`hf download {hub_id} {files[0]}` where the "
            f"network is reachable, then copy the cache), or pass --weights PATH/TO/{files[0]}"
        )
    url = getattr(cfg, "url", None)
    if url:
        target = checkpoint_dir() / os.path.basename(url)
        if target.is_file():
            return target
        raise WeightsError(
            f"timm:{name} DEFAULT weights are not cached: put {target.name} (from {url}) in {target.parent}, "
            "or pass --weights PATH"
        )
    raise WeightsError(f"timm:{name} has no pretrained weights; use --weights NONE or a path")


def _create(name: str, size: int | None, **kwargs: Any) -> nn.Module:
    """``timm.create_model``; with ``size``, built for ``size x size`` inputs where the model takes ``img_size``."""
    timm = import_timm()
    with warnings.catch_warnings(), weights_only_loading():
        warnings.simplefilter("ignore")
        try:
            if size is not None:
                try:
                    return timm.create_model(name, img_size=size, **kwargs)
                except TypeError as exc:  # a CNN: any input size, no img_size argument
                    if "img_size" not in str(exc):
                        raise
            return timm.create_model(name, **kwargs)
        except (WeightsError, ModelError):
            raise
        except Exception as exc:  # timm asserts and raises many types on configurations it cannot build
            where = f" for {size}x{size} inputs" if size is not None else ""
            raise ModelError(f"cannot build timm:{name}{where}: {one_line(exc)}") from None


def _classifier_names(cfg: Any, module: nn.Module) -> list[str]:
    names = getattr(cfg, "classifier", None) or getattr(module, "pretrained_cfg", {}).get("classifier")
    if isinstance(names, str):
        names = [names]
    return list(names or [])


def _checkpoint_classes(state: dict[str, Any], heads: list[str]) -> int | None:
    for head in heads:
        weight = state.get(f"{head}.weight")
        if weight is not None and weight.dim() >= 1:
            return int(weight.shape[0])
    return None


def _labels(cfg: Any, module: nn.Module, classes: int) -> list[str] | None:
    """The pretrained config's label names, else ImageNet's for 1,000 classes (or timm's for its subsets)."""
    names = getattr(cfg, "label_names", None) if cfg is not None else None
    if names and len(names) == classes:
        return [str(n) for n in names]
    if classes == 1000:
        return imagenet_categories()
    with contextlib.suppress(Exception):  # timm's ImageNet-21k and other subset label tables
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(module)
        if subset:
            info = ImageNetInfo(subset)
            if info.num_classes() == classes:
                return [str(d) for d in info.label_descriptions()]
    return None


def timm_preprocessing(
    module: nn.Module, size: int | None
) -> tuple[int, tuple[float, ...], tuple[float, ...], str, list[str]]:
    """Input size, mean, std and interpolation of a timm model (``resolve_data_config``); ``size`` overrides."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=module)
    _, height, width = config["input_size"]
    notes = []
    if height != width:
        notes.append(f"timm's input size is {height}x{width}; camx feeds {max(height, width)} square")
    interpolation = str(config.get("interpolation") or "bilinear")
    if interpolation not in INTERPOLATIONS:
        interpolation = "bilinear"
    chosen = size or max(height, width) or DEFAULT_INPUT_SIZE
    return int(chosen), tuple(config["mean"]), tuple(config["std"]), interpolation, notes


def load_timm(name: str, weights: str, num_classes: int | None, input_size: int | None = None) -> LoadedModel:
    """Build ``timm:NAME`` with its weights, preprocessing and labels (see the module docstring)."""
    timm = import_timm()
    if not name:
        raise ModelError("--model timm: needs a name, e.g. timm:resnet18; `camx models --source timm` lists them")
    arch = timm.models.split_model_name_tag(name)[0]
    if not timm.is_model(arch):
        raise ModelError(
            f"unknown timm model {arch!r}{suggest(arch, timm_names())}; `camx models --source timm` lists them"
        )
    spec = weights.strip()
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    cfg = _pretrained_cfg(name) if is_keyword(spec, "DEFAULT") or "." in name else None
    if is_keyword(spec, "NONE"):
        module, label = _create(name, input_size, pretrained=False, **kwargs), "NONE"
    elif is_keyword(spec, "DEFAULT"):
        trained = int(getattr(cfg, "num_classes", 0) or 0)
        if num_classes is not None and trained and num_classes != trained:
            raise WeightsError(
                f"--num-classes {num_classes} does not match timm:{name}'s pretrained weights ({trained} classes); "
                "pass fine-tuned weights as a path"
            )
        path = _cached_weights(name, cfg)
        overlay = {"file": str(path), "source": "timm"}
        module = _create(name, input_size, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        label = "DEFAULT"
    else:
        path = Path(spec)
        state = load_state_dict(path)
        module = _create(name, input_size, pretrained=False, **kwargs)
        heads = _classifier_names(cfg, module)
        found = _checkpoint_classes(state, heads)
        if num_classes is None and found is not None and found != _checkpoint_classes(module.state_dict(), heads):
            module = _create(name, input_size, pretrained=False, num_classes=found)
        apply_state_dict(module, state, str(path))
        label = str(path)
    size, mean, std, interpolation, notes = timm_preprocessing(module, input_size)
    classes = int(getattr(module, "num_classes", 0) or 0)
    categories = _labels(cfg, module, classes) if classes else None
    return LoadedModel(module, label, size, mean, std, categories, interpolation, notes)
