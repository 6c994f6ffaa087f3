"""camx from Python: the same models, probe, methods and normalisation as the CLI,
for notebooks and other programs.

:func:`load_model` gives the model ``camx explain --model NAME`` would use, with its
preprocessing; :func:`explain` runs one or several methods on a batch of normalised
images from one pass, as ``camx explain`` does, and returns the maps at the images'
size. ``cam_cli.explain``, ``cam_cli.load_model`` and :class:`MethodMaps` are the
public names; everything else in the package is internal.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from cam_cli.device import resolve_device, use_ieee_fp32
from cam_cli.errors import CamxError, InputError, ModelError
from cam_cli.jobs.base import autocast, check_precision
from cam_cli.jobs.explain.session import build_explainer, check_methods, dry_run, resolve_for
from cam_cli.methods import BatchExplainer, MethodOptions, MultiExplanation, Setup
from cam_cli.models import Classifier, load_classifier
from cam_cli.probe import run_probe
from cam_cli.render import upsample_normalise
from cam_cli.targets import TargetSpec


@dataclass(frozen=True)
class MethodMaps:
    """One method's maps of a batch of ``N`` images of ``H x W`` pixels.

    ``maps``: float32 in [0, 1], min-max'ed per map as the CLI's ``.npy`` maps are
    (the hottest pixel is exactly 1, the coldest 0; a flat map is all zeros);
    ``(N, H, W)`` for ``target="top1"`` or one class, ``(N, K, H, W)`` for
    ``target="topK"`` with ``K > 1``. ``classes``: the class each map explains, int64,
    ``(N,)`` or ``(N, K)``. ``scores``: the softmax probability of that class, float32,
    same shape as ``classes``. Methods that are not class-specific (Eigen-CAM) give one
    map an image, of the top-1 class, whatever the target: ``(N, 1, H, W)`` for topK;
    ``dff`` gives ``concepts`` maps an image, ``(N, C, H, W)``, each with the class the
    network gives its concept and that class's probability for it, best first.
    ``gradients``: for ``guided-backprop`` and ``guided-gradcam``, the 3-channel image
    behind each map (the guided gradient, times the Grad-CAM map for the latter), float32
    ``(N, 3, H, W)`` or ``(N, K, 3, H, W)``, not normalised; None for the other methods.
    All of them are on the device the model ran on.
    """

    maps: torch.Tensor
    classes: torch.Tensor
    scores: torch.Tensor
    gradients: torch.Tensor | None = None


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

    Args:
        name: anything ``--model`` takes: a torchvision name (``resnet50``),
            ``timm:NAME``, ``hf:PATH``, ``package.module:factory``, a ``.pt2`` file.
        weights: ``DEFAULT`` (from the local cache, downloaded when missing),
            ``NONE`` (random, seeded by ``seed``), a weights enum name or a checkpoint.
        num_classes, labels, input_size, mean, std, output_key: as the CLI's options
            of the same names (``labels``: a file of class names, one a line).
        seed: the seed of ``weights="NONE"``: the same seed builds the same model.

    Returns:
        A :class:`~cam_cli.models.Classifier`: ``module`` (on the CPU, eval mode,
        parameters frozen), ``input_size`` ``S`` (images are resized to ``S x S``),
        ``mean`` and ``std`` (per channel, in 0..1 units), ``categories`` (class names
        or None) and ``logits(x)`` (``(N, 3, S, S)`` -> ``(N, C)``). Pass it to
        :func:`explain` as the model; it reads its ``output_key`` and class names.

    Raises:
        ModelError: an unknown model name, or overrides that do not fit it.
        WeightsError: weights that cannot be found, read or matched to the model.

    Example::

        model = cam_cli.load_model("resnet50")
        mean = torch.tensor(model.mean).view(1, 3, 1, 1)
        std = torch.tensor(model.std).view(1, 3, 1, 1)
        x = (images.float() / 255 - mean) / std  # images: uint8 (N, 3, S, S)
        maps = cam_cli.explain(model, x)["gradcam"].maps
    """
    return load_classifier(name, weights, num_classes, Path(labels) if labels else None, input_size, mean, std,
                           output_key, seed=seed)  # fmt: skip


def explain(
    model: nn.Module | Classifier,
    inputs: torch.Tensor,
    methods: str | Sequence[str] = "gradcam",
    layer: str | Sequence[str] | None = None,
    target: str | int = "top1",
    *,
    output_key: str | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    batch_size: int = 16,
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
    finer_gamma: float = 1.0,
    seed: int = 0,
    kpca_kernel: str = "sigmoid",
    kpca_gamma: float | None = None,
    noise_samples: int | None = None,
    noise_std: float | None = None,
    concepts: int = 5,
    sess_base: str = "gradcam",
    sess_scales: int = 12,
) -> dict[str, MethodMaps]:
    """Explain a batch with one or several CAM methods, all from one forward pass a chunk.

    The model is probed and its layer chosen as ``camx explain`` does; every method
    is checked before the run; each chunk of ``batch_size`` images gets one forward
    and at most one backward pass shared by all the methods (Score-CAM and the other
    perturbation methods add passes of their own).

    Args:
        model: an ``nn.Module`` mapping ``(N, 3, H, W)`` to logits ``(N, C)`` (or to a
            tuple/dict holding them: name the entry with ``output_key``), or
            :func:`load_model`'s result. Left as it was: its mode (per submodule),
            ``requires_grad`` flags and device are restored and no hook or ``.grad``
            is left on it. The probe runs on the CPU, so a model on a GPU makes one
            round trip to the CPU.
        inputs: normalised float images ``(N, 3, H, W)`` (the model's mean and std
            already applied), on any device.
        methods: a name, a comma-separated list or a sequence of names, as
            ``camx methods`` lists them (``"gradcam"``, ``"gradcam++"``, ``"eigencam"``...).
        layer: the target layer, as ``--layer`` (``"layer4"``, ``"features.7"``,
            ``"avgpool:input"``); by default the last spatial map before the pooling
            head, chosen from the model's structure. Several layers (a sequence, or
            ``"layer3,layer4"``) are hooked in the same pass and their maps fused: each
            min-maxed, resized to the input and averaged (pytorch-grad-cam's
            ``target_layers``).
        target: ``"top1"``, ``"topK"`` (the K best classes), a class index, or a class
            name (for :func:`load_model`'s models with class names).
        output_key: which entry of a tuple/dict output holds the logits.
        device: where to run (``"cpu"``, ``"cuda:1"``, ``"auto"``); by default the
            model's device. ``inputs`` are moved there.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (autocast for the model only;
            the maps are computed in float32).
        batch_size: images per pass (and per masked pass of Score-CAM and the like).
        aug_smooth, eigen_smooth, finer_gamma, seed, kpca_kernel, kpca_gamma, noise_samples, noise_std, concepts,
            sess_base, sess_scales:
            as the CLI's ``--aug-smooth``, ``--eigen-smooth``, ``--finer-gamma``, ``--seed``,
            ``--kpca-kernel``, ``--kpca-gamma``, ``--noise-samples``, ``--noise-std``, ``--concepts``,
            ``--sess-base`` and ``--sess-scales``
            (None: the method's own default).

    Returns:
        ``{method: MethodMaps}`` in the order of ``methods``; see :class:`MethodMaps`
        for the shapes: maps ``(N, H, W)`` (``(N, K, H, W)`` for topK) at the inputs'
        size, classes and scores ``(N,)`` (``(N, K)``).

    Raises:
        InputError: ``inputs`` not a float tensor ``(N, 3, H, W)``, or ``model`` not a module.
        ModelError: an unknown or unusable layer, a target the model does not have,
            a method that cannot apply (CAM on a head that is not GAP + linear) or
            fails on the model; the message names the reason in one line.
        DeviceError: a ``device`` that is not present.
        CamxError: an unknown method or precision, or an option that does not apply
            to the methods asked for (``layer`` for FullGrad alone).

    Example::

        model = torchvision.models.resnet50(weights="DEFAULT").eval()
        x = weights.transforms()(images)  # (N, 3, 224, 224), normalised
        result = cam_cli.explain(model, x, methods=["gradcam", "eigencam"])
        result["gradcam"].maps  # (N, 224, 224) in [0, 1]
        result["gradcam"].classes, result["gradcam"].scores  # (N,): top-1 class, probability
        cam_cli.explain(model, x, target="top3", layer="layer3")["gradcam"].maps  # (N, 3, 224, 224)
    """
    _check_inputs(inputs)
    layer = layer if layer is None or isinstance(layer, str) else ",".join(layer)
    names = check_methods(
        [methods] if isinstance(methods, str) else list(methods), layer, aug_smooth, eigen_smooth, "layer"
    )
    check_precision(precision)
    if batch_size < 1:
        raise CamxError(f"batch_size must be at least 1, not {batch_size}")
    classifier = _as_classifier(model, int(inputs.shape[-2]), output_key)
    if noise_samples is not None and noise_samples < 1:
        raise CamxError(f"noise_samples must be at least 1, not {noise_samples}")
    if noise_std is not None and not (math.isfinite(noise_std) and noise_std >= 0):
        raise CamxError(f"noise_std must be a finite number >= 0, not {noise_std}")
    if concepts < 1:
        raise CamxError(f"concepts must be at least 1, not {concepts}")
    if sess_scales < 1:
        raise CamxError(f"sess_scales must be at least 1, not {sess_scales}")
    options = MethodOptions(seed=seed, finer_gamma=finer_gamma, eigen_smooth=eigen_smooth, kpca_kernel=kpca_kernel,
                            kpca_gamma=kpca_gamma, noise_samples=noise_samples, noise_std=noise_std,
                            concepts=concepts, sess_base=sess_base, sess_scales=sess_scales)  # fmt: skip
    with _borrowed(classifier.module) as home:
        run_on = home if device is None else resolve_device(device) if isinstance(device, str) else device
        text = _target_text(target)
        explainer, spec = _prepare(classifier, names, layer, text, options, run_on, precision, inputs, aug_smooth,
                                   batch_size)  # fmt: skip
        with _ieee_fp32(run_on):
            return _run(explainer, spec, inputs.detach().to(run_on), batch_size)


def _check_inputs(inputs: torch.Tensor) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4 or inputs.shape[1] != 3 or inputs.shape[0] == 0:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise InputError(f"inputs must be a normalised float tensor of shape (N, 3, H, W), not {shape}")
    if not inputs.is_floating_point():
        raise InputError(f"inputs must be normalised floats, not {inputs.dtype} (apply the model's mean and std)")


def _target_text(target: str | int) -> str:
    if isinstance(target, str):
        return target
    try:
        return str(operator.index(target))
    except TypeError:
        raise CamxError(f"target must be 'top1', 'topK', a class index or name, not {target!r}") from None


def _as_classifier(model: nn.Module | Classifier, size: int, output_key: str | None) -> Classifier:
    if isinstance(model, Classifier):
        return model if output_key is None else replace(model, output_key=output_key)
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module or cam_cli.load_model's result, not {type(model).__name__}")
    return Classifier(model, type(model).__name__, "as given", size, output_key=output_key)


@contextlib.contextmanager
def _borrowed(module: nn.Module) -> Iterator[torch.device]:
    """``module`` for one call: eval mode and frozen parameters (so that no gradient
    lands in their ``.grad`` and autograd records only what follows the target layer),
    then each submodule's mode, each parameter's ``requires_grad`` and the device as
    they were. Yields the device the module is on."""
    devices = {t.device for t in (*module.parameters(), *module.buffers())}
    if len(devices) > 1:
        raise ModelError(f"the model is spread over {len(devices)} devices; explain needs it on one")
    home = devices.pop() if devices else torch.device("cpu")
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    module.requires_grad_(False)
    try:
        yield home
    finally:
        module.to(home)
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    """On CUDA, float32 convolutions in IEEE float32 rather than TF32 for the call, as the
    CLI runs them (:func:`~cam_cli.device.use_ieee_fp32`); the caller's setting is restored."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    attribute = "fp32_precision" if conv is not None and hasattr(conv, "fp32_precision") else "allow_tf32"
    owner = conv if attribute == "fp32_precision" else torch.backends.cudnn
    saved = getattr(owner, attribute)
    if device.type == "cuda":
        use_ieee_fp32()
    try:
        yield
    finally:
        setattr(owner, attribute, saved)


def _prepare(
    classifier: Classifier,
    names: list[str],
    layer: str | None,
    target: str,
    options: MethodOptions,
    device: torch.device,
    precision: str,
    inputs: torch.Tensor,
    aug_smooth: bool,
    batch_size: int,
) -> tuple[BatchExplainer, TargetSpec]:
    """What ``open_session`` does once the model is loaded: the probe (on the CPU, at
    the inputs' height), the layer, the target, the methods prepared on ``device``."""
    module = classifier.module.to("cpu")
    probe = run_probe(classifier, int(inputs.shape[-2]))
    _, layers, spec = resolve_for(classifier, probe, names, layer, target)
    module.to(device)
    forward = autocast(classifier.logits, device, precision)
    setup = Setup(probe, layers[0] if layers else None, module, forward, device, tuple(layers))
    return build_explainer(names, options, setup, aug_smooth, batch_size, classifier.readout), spec


def _run(explainer: BatchExplainer, spec: TargetSpec, inputs: torch.Tensor, batch_size: int) -> dict[str, MethodMaps]:
    """Every method's finished maps of ``inputs``, ``batch_size`` images a pass."""
    height, width = int(inputs.shape[-2]), int(inputs.shape[-1])
    parts: dict[str, list[tuple[torch.Tensor, ...]]] = {m.name: [] for m in explainer.methods}
    gradients: dict[str, list[torch.Tensor]] = {m.name: [] for m in explainer.methods if m.gives_gradients}
    for start in range(0, inputs.shape[0], batch_size):
        result = _explain_chunk(explainer, inputs[start : start + batch_size], spec, first=start == 0)
        for method in explainer.methods:
            raw = result.maps[method.name].detach()
            n, r = raw.shape[:2]
            maps = upsample_normalise(raw.flatten(0, 1), height, width).view(n, r, height, width)
            parts[method.name].append((maps, result.classes_of(method), result.scores_of(method).float()))
            if method.name in gradients:
                gradients[method.name].append(result.gradients[method.name].detach())
    out = {}
    for name, chunks in parts.items():
        maps, classes, scores = (torch.cat([chunk[i] for chunk in chunks]) for i in range(3))
        images = torch.cat(gradients[name]) if name in gradients else None
        if spec.count == 1 and maps.shape[1] == 1:  # dff's concepts stay (N, C, H, W)
            maps, classes, scores = maps[:, 0], classes[:, 0], scores[:, 0]
            images = None if images is None else images[:, 0]
        out[name] = MethodMaps(maps, classes, scores, images)
    return out


def _explain_chunk(explainer: BatchExplainer, x: torch.Tensor, spec: TargetSpec, first: bool) -> MultiExplanation:
    """One pass; when the first fails, each method alone on one image names the one that
    cannot run (``ModelError``), as the CLI's dry run does."""
    try:
        return explainer.explain(x, spec.chooser(explainer.readout.ranking))
    except CamxError:
        raise
    except Exception:
        if first:
            dry_run(explainer, x[:1], spec)
        raise


__all__ = ["MethodMaps", "explain", "load_model"]
