"""camx from Python: the same models, probe, methods and normalisation as the CLI,
for notebooks and other programs. ``cam_cli.explain`` and ``cam_cli.load_model``
are the public names; everything else in the package is internal."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cam_cli.errors import InputError
from cam_cli.methods import BatchExplainer, MethodOptions, Setup, create, parse_methods
from cam_cli.models import Classifier, load_classifier
from cam_cli.probe import resolve_target, run_probe
from cam_cli.render import upsample_normalise
from cam_cli.targets import parse_target


@dataclass(frozen=True)
class MethodMaps:
    """One method's maps of a batch.

    ``maps``: ``(N, H, W)`` float32 in [0, 1] at the inputs' size (``(N, K, H, W)`` for
    ``target="topK"``, K > 1), min-max'ed as the CLI's ``.npy`` maps are (a flat map
    is all zeros); ``classes``: the explained class of each map, ``(N,)`` or ``(N, K)``;
    ``scores``: the softmax probability of that class, same shape.
    """

    maps: torch.Tensor
    classes: torch.Tensor
    scores: torch.Tensor


def load_model(
    name: str,
    weights: str = "DEFAULT",
    *,
    num_classes: int | None = None,
    labels: str | Path | None = None,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    output_key: str | None = None,
    seed: int = 0,
) -> Classifier:
    """The model ``camx explain --model NAME --weights WEIGHTS`` uses, with its preprocessing.

    ``name`` is anything ``--model`` takes (``resnet50``, ``timm:NAME``, ``hf:PATH``,
    ``package.module:factory``, a ``.pt2`` file); ``weights`` is ``DEFAULT`` (from the
    local cache), ``NONE`` (random, seeded by ``seed``), a weights enum name or a
    checkpoint path. Returns a :class:`~cam_cli.models.Classifier`: ``module`` (eval
    mode, frozen), ``input_size``, ``mean`` and ``std`` (0..1 units), ``categories``.
    Raises ``ModelError`` / ``WeightsError`` with a one-line reason.

    Example::

        model = cam_cli.load_model("resnet18", weights="NONE")
    """
    return load_classifier(name, weights, num_classes, Path(labels) if labels else None, input_size, mean, std,
                           output_key, seed=seed)  # fmt: skip


def _as_classifier(model: nn.Module | Classifier, size: int, output_key: str | None) -> Classifier:
    if isinstance(model, Classifier):
        return model
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module or cam_cli.load_model's result, not {type(model).__name__}")
    return Classifier(model, type(model).__name__, "as given", size, output_key=output_key)


def _check_inputs(inputs: torch.Tensor) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4 or inputs.shape[1] != 3 or inputs.shape[0] == 0:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise InputError(f"inputs must be a normalised float tensor of shape (N, 3, H, W), not {shape}")
    if not inputs.is_floating_point():
        raise InputError(f"inputs must be normalised floats, not {inputs.dtype} (apply the model's mean and std)")


def explain(
    model: nn.Module | Classifier,
    inputs: torch.Tensor,
    methods: str | Sequence[str] = "gradcam",
    layer: str | None = None,
    target: str | int = "top1",
    *,
    output_key: str | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, MethodMaps]:
    """Explain a batch with one or several CAM methods, all from one forward pass.

    ``model``: an ``nn.Module`` returning logits ``(N, C)`` (or a tuple/dict holding
    them: name the entry with ``output_key``), or :func:`load_model`'s result.
    ``inputs``: normalised float images ``(N, 3, H, W)`` on the model's device.
    ``methods``: a name or names as ``camx methods`` lists them (``"gradcam,eigencam"``
    works too). ``layer``: as ``--layer`` (default: chosen from the model's structure,
    as the CLI chooses it). ``target``: ``"top1"``, ``"topK"``, a class index or name.

    Returns ``{method: MethodMaps}``, maps at the inputs' size, min-max'ed as the CLI's
    ``.npy`` maps are. The model is left as it was (mode, hooks, device). Raises
    ``InputError`` for inputs of the wrong shape, ``ModelError`` when a method cannot
    apply (CAM on a head that is not GAP + linear) or a layer is unknown.

    Example::

        model = torchvision.models.resnet50(weights="DEFAULT").eval()
        result = cam_cli.explain(model, x, methods=["gradcam", "eigencam"])
        result["gradcam"].maps  # (N, H, W) in [0, 1]
    """
    _check_inputs(inputs)
    names = parse_methods([methods] if isinstance(methods, str) else list(methods))
    classifier = _as_classifier(model, int(inputs.shape[-2]), output_key)
    module = classifier.module
    was_training = module.training
    device = inputs.device
    home = next((p.device for p in module.parameters()), device)
    module.eval()
    try:
        return _explain(classifier, inputs, names, layer, str(target), batch_size, seed)
    finally:
        module.to(home)
        module.train(was_training)


def _explain(
    classifier: Classifier, inputs: torch.Tensor, names: list[str], layer: str | None, target: str, batch_size: int,
    seed: int,
) -> dict[str, MethodMaps]:  # fmt: skip
    from cam_cli.methods.registry import info

    module = classifier.module.to("cpu")  # the probe runs on the CPU
    probe = run_probe(classifier, int(inputs.shape[-2]))
    num_classes = int(probe.logits.shape[1])
    target_layer = resolve_target(probe, layer) if any(info(n).uses_layer for n in names) else None
    spec = parse_target(target, classifier, num_classes)
    module.to(inputs.device)
    methods = [create(name, MethodOptions(seed=seed)) for name in names]
    for method in methods:
        method.prepare(Setup(probe, target_layer, module, classifier.logits, inputs.device))
    explainer = BatchExplainer(classifier.logits, module, target_layer, methods)
    explainer.batch_size = batch_size
    height, width = int(inputs.shape[-2]), int(inputs.shape[-1])
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    for start in range(0, inputs.shape[0], batch_size):
        result = explainer.explain(inputs[start : start + batch_size], spec.chooser())
        for method in methods:
            classes = result.classes_of(method)
            maps = torch.stack([upsample_normalise(m, height, width) for m in result.maps[method.name].detach()])
            parts[method.name].append((maps, classes, result.scores(classes)))
    out = {}
    for name, chunks in parts.items():
        maps, classes, scores = (torch.cat([c[i] for c in chunks]) for i in range(3))
        if maps.shape[1] == 1:
            maps, classes, scores = maps[:, 0], classes[:, 0], scores[:, 0]
        out[name] = MethodMaps(maps, classes, scores.float())
    return out


__all__ = ["MethodMaps", "explain", "load_model"]
