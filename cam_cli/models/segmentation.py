"""torchvision's semantic segmentation models (``fcn_*``, ``deeplabv3_*``, ``lraspp_*``) and
their target: for class ``c``, the sum of the ``c`` logits over the pixels the model assigns
to ``c`` (pytorch-grad-cam's ``SemanticSegmentationTarget`` with the predicted mask).

The models return ``{"out": (N, C, S, S), "aux": ...}``; only ``out`` is read. The mask is the
argmax of ``out`` on the unperturbed image, and stays that image's in every later pass over
its perturbed copies (:meth:`Readout.pinned`), as pytorch-grad-cam keeps its target's mask.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torchvision
from torch import nn

from cam_cli.errors import ModelError, WeightsError
from cam_cli.models.base import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, apply_state_dict, load_state_dict
from cam_cli.models.readout import Readout

#: the class every torchvision segmentation model gives index 0: never a ``topK`` target
BACKGROUND = 0
#: the side camx resizes images to when neither the weights nor ``--input-size`` say (torchvision's 520)
SEGMENTATION_SIZE = 520

#: the methods that cannot explain a class's region, and why
REFUSED = {
    "cam": "it needs a global-average-pooling + linear head, and a segmentation head is convolutional "
    "(use gradcam, which equals CAM where CAM applies)",
    "finercam": "it compares a class with the nearest other class by logit, and another class's region "
    "is other pixels, not an alternative reading of the same ones",
    "dff": "it names its concepts through a classifier's linear head, which a segmentation model lacks",
}


def segmentation_models() -> list[str]:
    """Every semantic segmentation model torchvision registers."""
    return sorted(torchvision.models.list_models(module=torchvision.models.segmentation))


@dataclass
class Regions:
    """What the free pass of a batch fixed: per pixel the class it is assigned to
    ``labels`` ``(N, H, W)``, per image and class the pixels it covers ``counts`` ``(N, C)``
    and its mean softmax probability over them ``probabilities`` ``(N, C)``."""

    labels: torch.Tensor
    counts: torch.Tensor
    probabilities: torch.Tensor | None = None


class _UpsampledRegionSums(torch.autograd.Function):
    """The region sums ``(N, C)`` of ``out``, the bilinear upsample (``align_corners`` False) of
    the logits ``low`` ``(N, C, h, w)``, differentiated with respect to ``low``.

    Autograd would scatter each explained class's gradient over an ``(N, C, H, W)`` tensor and
    run the upsample's backward over every class; the sum over a fixed mask is linear in the
    upsampled logits, so only the (image, class) pairs with a non-zero gradient need the
    upsample's backward, each on its one mask. The same arithmetic for those pairs, zeros
    for the rest (as autograd's)."""

    @staticmethod
    def forward(ctx: Any, low: torch.Tensor, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(labels)
        ctx.low_shape, ctx.low_dtype = low.shape, low.dtype
        return RegionReadout._region_sums(out, labels)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (labels,) = ctx.saved_tensors
        grad_low = grad.new_zeros(ctx.low_shape, dtype=ctx.low_dtype)
        images, classes = grad.nonzero(as_tuple=True)
        if len(images):
            masks = (labels[images] == classes.view(-1, 1, 1)).to(grad.dtype) * grad[images, classes].view(-1, 1, 1)
            h, w = ctx.low_shape[-2:]
            back = torch.ops.aten.upsample_bilinear2d_backward(masks[:, None], list(labels.shape[-2:]),
                                                               [len(images), 1, h, w], False)  # fmt: skip
            grad_low[images, classes] = back[:, 0].to(grad_low.dtype)
        return grad_low, None, None


class RegionReadout(Readout):
    """Targets ``(N, C)``: per class, the sum of its logits over the pixels assigned to it."""

    task: ClassVar[str] = "segmentation"
    score_name: ClassVar[str] = "mean probability over the region"
    record_fields: ClassVar[tuple[str, ...]] = ("region_share", "region_probability")

    def __init__(self, categories: list[str] | None = None) -> None:
        super().__init__()
        self.categories = categories
        self.regions: Regions | None = None
        #: the mean softmax probability of each class over its region, from the last pass ``(N, C)``
        self.probabilities: torch.Tensor | None = None
        self._pin: torch.Tensor | None = None  # (M, H, W) the masks the next passes read

    def __call__(self, output: Any) -> torch.Tensor:
        out = self._out(output)
        return self._region_sums(out, self._fix(out))

    @staticmethod
    def _out(output: Any) -> torch.Tensor:
        out = output["out"] if isinstance(output, dict) else output
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise ModelError("a segmentation model must return (N, C, H, W) logits, or a dict with them as 'out'")
        return out

    def _fix(self, out: torch.Tensor) -> torch.Tensor:
        """The masks this pass reads ``(N, H, W)``: the argmax of ``out``, or the pinned ones;
        records the classes' pixel counts and mean probabilities over them."""
        n, classes = out.shape[:2]
        with torch.no_grad():
            detached = out.detach().float()
            labels = detached.argmax(dim=1) if self._pin is None else self._pin
            if labels.shape[0] != n or labels.shape[1:] != out.shape[2:]:
                raise ModelError("a pinned segmentation pass got a batch that does not match its masks")
            counts = self._counts(labels, classes)
            self.probabilities = self._own_probabilities(detached, labels) / counts.clamp(min=1)
            if self._pin is None:
                self.regions = Regions(labels, counts, self.probabilities)
        return labels

    def read(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """With gradients on, a torchvision segmentation model's final bilinear upsample runs
        outside the graph: the targets are differentiated from the head's low-resolution
        logits through :class:`_UpsampledRegionSums` (the same gradient, for the explained
        classes only). Otherwise as ``self(module(x))``."""
        head = getattr(module, "classifier", None)
        if not torch.is_grad_enabled() or not is_segmentation_model(module) or not isinstance(head, nn.Module):
            return self(module(x))
        found: list[torch.Tensor] = []

        def keep(_: nn.Module, __: Any, low: Any) -> Any:
            if isinstance(low, torch.Tensor) and low.requires_grad and not found:
                found.append(low)
                return low.detach()
            return None

        handle = head.register_forward_hook(keep)
        try:
            output = module(x)
        finally:
            handle.remove()
        out = self._out(output)
        if len(found) == 1 and not out.requires_grad and found[0].shape[:2] == out.shape[:2]:
            return _UpsampledRegionSums.apply(found[0], out, self._fix(out))
        return self(module(x) if found else output)  # not the layout assumed: through autograd alone

    @staticmethod
    def _region_sums(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(N, C)``: per class ``c``, ``sum`` of ``out[:, c]`` over the pixels where ``labels == c``."""
        index = labels.flatten(1).unsqueeze(1)  # (N, 1, P)
        own = out.flatten(2).gather(1, index).squeeze(1)  # (N, P): each pixel's logit of its own class
        return torch.zeros(out.shape[:2], dtype=own.dtype, device=own.device).scatter_add(1, index.squeeze(1), own)

    @staticmethod
    def _own_probabilities(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(N, C)``: per class, the sum of its softmax probability over the pixels where
        ``labels`` is that class. Each pixel needs only its own class's probability,
        ``exp(logit - logsumexp(logits))``: a third of the passes over the full-resolution
        logits that a whole softmax takes (the same value up to float rounding)."""
        index = labels.flatten(1).unsqueeze(1)  # (N, 1, P)
        own = out.flatten(2).gather(1, index).squeeze(1)  # (N, P)
        probability = (own - torch.logsumexp(out, dim=1).flatten(1)).exp_()
        return torch.zeros(out.shape[:2], dtype=own.dtype, device=own.device).scatter_add(1, index.squeeze(1),
                                                                                        probability)  # fmt: skip

    @staticmethod
    def _counts(labels: torch.Tensor, classes: int) -> torch.Tensor:
        """``(N, C)``: the pixels assigned to each class."""
        flat = labels.flatten(1)
        ones = torch.ones(flat.shape, dtype=torch.float32, device=flat.device)
        return torch.zeros(len(flat), classes, device=flat.device).scatter_add_(1, flat, ones)

    @contextlib.contextmanager
    def pinned(self, rows: torch.Tensor | None = None) -> Iterator[None]:
        if self.regions is None:
            raise ModelError("a pinned segmentation pass needs a free pass first")
        saved = self._pin
        labels = self.regions.labels
        self._pin = labels if rows is None else labels.index_select(0, rows.to(labels.device))
        try:
            yield
        finally:
            self._pin = saved

    def ranking(self, targets: torch.Tensor) -> torch.Tensor:
        """The pixels each class covers, ``-inf`` for the background and for absent classes."""
        assert self.regions is not None
        counts = self.regions.counts.to(targets.device).clone()
        counts[:, BACKGROUND] = 0
        return counts.masked_fill(counts <= 0, float("-inf"))

    def scores(self, targets: torch.Tensor) -> torch.Tensor:
        """The mean probability of each class over its region: in a pinned pass that pass's
        (over the original image's region), else the free pass's."""
        if self._pin is not None:
            probabilities = self.probabilities
        else:
            probabilities = None if self.regions is None else self.regions.probabilities
        assert probabilities is not None and probabilities.shape[1:] == targets.shape[1:]
        return probabilities[: len(targets)].to(targets.device)  # after a stop: the first images

    def details(self, classes: torch.Tensor) -> list[list[dict[str, Any]]] | None:
        assert self.regions is not None
        counts = self.regions.counts
        pixels = float(self.regions.labels[0].numel())
        chosen = classes.to(counts.device)
        share = (counts.gather(1, chosen) / pixels).cpu().tolist()
        assert self.regions.probabilities is not None
        probability = self.regions.probabilities.to(counts.device).gather(1, chosen).cpu().tolist()
        return [
            [{"region_share": round(s, 6), "region_probability": round(p, 6)} for s, p in zip(rs, rp, strict=True)]
            for rs, rp in zip(share, probability, strict=True)
        ]

    def refusal(self, method: str) -> str | None:
        return REFUSED.get(method)

    def absent(self, classes: torch.Tensor) -> list[str | None]:
        assert self.regions is not None
        counts = self.regions.counts.gather(1, classes.to(self.regions.counts.device)).cpu().tolist()
        reasons: list[str | None] = []
        for row, chosen in zip(counts, classes.cpu().tolist(), strict=True):
            missing = [c for c, count in zip(chosen, row, strict=True) if count <= 0 or c == BACKGROUND]
            reasons.append(None if not missing else self._why(missing[0]))
        return reasons

    def _why(self, index: int) -> str:
        name = self.categories[index] if self.categories and 0 <= index < len(self.categories) else None
        label = f"class {index}" + (f" ({name})" if name else "")
        if index == BACKGROUND:
            return "the model assigns every pixel of this image to the background: no class region to explain"
        return f"the model assigns no pixel of this image to {label}: there is no region to explain"


def _build(name: str, num_classes: int | None, aux: bool) -> nn.Module:
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if aux and not name.startswith("lraspp"):
        kwargs["aux_loss"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, **kwargs)


def _head_classes(module: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The classes a checkpoint's segmentation head gives (its last conv under ``classifier``)."""
    last = None
    for name, child in module.named_modules():
        if name.startswith("classifier") and isinstance(child, nn.Conv2d):
            last = name
    weight = state.get(f"{last}.weight") if last else None
    return int(weight.shape[0]) if weight is not None else None


def load_segmentation(name: str, weights: str, num_classes: int | None, input_size: int | None) -> LoadedModel:
    """``name`` with ``--weights``: ``DEFAULT``, an enum member, ``NONE`` (seeded), or a checkpoint path."""
    from cam_cli.models.torchvision_models import _chosen_weights, _load_pretrained, _weights_enum

    enum = _weights_enum(name)
    default = enum.DEFAULT if enum is not None else None
    spec = weights.strip()
    chosen = _chosen_weights(name, enum, default, spec)
    if chosen is not None:  # its transforms' resize (520) and normalisation
        return _load_pretrained(name, chosen, num_classes, input_size)
    size = input_size or SEGMENTATION_SIZE
    if spec.upper() == "NONE":
        return LoadedModel(_build(name, num_classes, aux=False), "NONE", size, IMAGENET_MEAN, IMAGENET_STD)
    path = Path(spec)
    state = load_state_dict(path)
    aux = any(key.startswith("aux_classifier.") for key in state)
    module = _build(name, num_classes, aux)
    found = _head_classes(module, state)
    if num_classes is None and found is not None and found != _head_classes(module, module.state_dict()):
        module = _build(name, found, aux)
    elif num_classes is not None and found is not None and found != num_classes:
        raise WeightsError(f"--num-classes {num_classes} does not match {path} ({found} classes)")
    apply_state_dict(module, state, str(path))
    return LoadedModel(module, str(path), size, IMAGENET_MEAN, IMAGENET_STD)


def voc_categories(module: nn.Module) -> list[str] | None:
    """The 21 classes every torchvision segmentation weights use (COCO with VOC's labels),
    for a model whose head has 21 outputs; else None."""
    found = _head_classes(module, module.state_dict())
    names = list(torchvision.models.segmentation.FCN_ResNet50_Weights.DEFAULT.meta["categories"])
    return names if found == len(names) else None


def is_segmentation_model(module: nn.Module) -> bool:
    """Whether ``module`` is one of torchvision's segmentation classes (FCN, DeepLabV3, LRASPP),
    however it was built: its output is ``{"out": (N, C, H, W)}``."""
    from torchvision.models.segmentation._utils import _SimpleSegmentationModel
    from torchvision.models.segmentation.lraspp import LRASPP

    return isinstance(module, (_SimpleSegmentationModel, LRASPP))
