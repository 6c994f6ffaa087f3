"""Find target layers from a model's own structure, by watching one forward pass.

The probe runs a single random image through the model with a hook on every
module, and records what each module returns (and what enters each pooling
module), in the order the modules finish.  From that record:

* the default target is the tensor that enters the *global* pooling module
  (named after the module that produced it when there is one, e.g.
  ``layer4``); without such a module, the last spatial feature map; for token
  models (ViT), the last token sequence whose patch tokens still influence the
  predicted class;
* CAM applies when the logits equal ``W @ mean_ij(A) + b`` for the model's
  final linear layer, checked numerically on the probe's own activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cam_cli.errors import ModelError
from cam_cli.methods.base import Layout, TargetLayer, to_feature_map
from cam_cli.models import Classifier

POOLING = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d)
MAX_EXTRA_TOKENS = 8


@dataclass
class Record:
    """One module output (or pooling input) seen by the probe."""

    name: str
    point: str
    module_type: str
    shape: tuple[int, ...]
    order: int
    tensor: torch.Tensor = field(repr=False)
    is_pooling: bool = False
    is_leaf: bool = True
    calls: int = 1

    @property
    def label(self) -> str:
        return self.name if self.point == "output" else f"{self.name}:input"


@dataclass
class Probe:
    records: list[Record]
    logits: torch.Tensor
    input_size: int
    modules: dict[str, nn.Module]
    #: (position in ``records`` when the call finished, module name) of every leaf module call
    leaf_calls: list[tuple[int, str]] = field(default_factory=list)

    def find(self, label: str) -> Record | None:
        for record in reversed(self.records):
            if record.label == label:
                return record
        return None


def _layout_of(shape: tuple[int, ...]) -> Layout:
    # Square inputs: NCHW has h == w at dims 2, 3; channels-last has them at 1, 2.
    if len(shape) == 4 and shape[2] != shape[3] and shape[1] == shape[2]:
        return "nhwc"
    return "nchw"


def _spatial(shape: tuple[int, ...]) -> int:
    if len(shape) != 4:
        return 0
    layout = _layout_of(shape)
    return shape[1] * shape[2] if layout == "nhwc" else shape[2] * shape[3]


def run_probe(classifier: Classifier, input_size: int | None = None) -> Probe:
    """One forward and backward pass of a seeded random image, on the CPU."""
    model = classifier.module
    size = input_size or classifier.input_size
    records: list[Record] = []
    leaf_calls: list[tuple[int, str]] = []
    counts: dict[str, int] = {}
    handles = []
    modules = dict(model.named_modules())

    def on_output(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_: nn.Module, __: Any, output: Any) -> None:
            if not any(module.children()):
                leaf_calls.append((len(records), name))
            if isinstance(output, torch.Tensor) and output.dim() >= 3:
                counts[name] = counts.get(name, 0) + 1
                if output.requires_grad and output.dim() == 3:
                    output.retain_grad()  # token models: which tokens reach the logits
                records.append(
                    Record(name, "output", type(module).__name__, tuple(output.shape), len(records),
                           output, isinstance(module, POOLING), not any(module.children()), counts[name])
                )
        return hook

    def on_input(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
                records.append(
                    Record(name, "input", type(module).__name__, tuple(args[0].shape), len(records),
                           args[0], True, True)
                )
        return hook

    for name, module in modules.items():
        if not name:
            continue
        try:
            handles.append(module.register_forward_hook(on_output(name, module)))
            if isinstance(module, POOLING):
                handles.append(module.register_forward_pre_hook(on_input(name, module)))
        except (RuntimeError, AttributeError):  # TorchScript submodules take no hooks
            continue
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=generator).requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = classifier.logits(x)
            if logits.dim() != 2:
                raise ModelError(f"the model's logits have shape {tuple(logits.shape)}, expected (N, classes)")
            logits[0, int(logits[0].argmax())].backward()
    except ModelError:
        raise
    except Exception as exc:
        message = " ".join(str(exc).split())[:240]
        raise ModelError(f"{classifier.name} fails on a {size}x{size} input: {message}") from None
    finally:
        for handle in handles:
            handle.remove()
    return Probe(records, logits.detach(), size, modules, leaf_calls)


def _grid_before(probe: Probe, record: Record) -> tuple[int, int] | None:
    """The patch grid of a token record: the last spatial map computed before it."""
    for earlier in reversed(probe.records[: record.order]):
        if len(earlier.shape) == 4 and _spatial(earlier.shape) > 1:
            shape = earlier.shape
            gh, gw = (shape[1], shape[2]) if _layout_of(shape) == "nhwc" else (shape[2], shape[3])
            extra = record.shape[1] - gh * gw
            if 0 <= extra <= MAX_EXTRA_TOKENS:
                return (gh, gw)
            return None
    return None


def target_for(probe: Probe, record: Record) -> TargetLayer:
    """The ``TargetLayer`` that reads ``record`` as a feature map."""
    if len(record.shape) == 3:
        grid = _grid_before(probe, record)
        if grid is None:
            raise ModelError(
                f"layer {record.label} gives {record.shape[1]} tokens that do not form the model's "
                "patch grid; choose another --layer"
            )
        return TargetLayer(record.name, record.point, "tokens", grid)  # type: ignore[arg-type]
    if len(record.shape) == 4:
        return TargetLayer(record.name, record.point, _layout_of(record.shape))  # type: ignore[arg-type]
    raise ModelError(f"layer {record.label} has shape {record.shape}, not a feature map")


def _patch_gradient(record: Record, grid: tuple[int, int]) -> float:
    grad = record.tensor.grad
    if grad is None:
        return 0.0
    return float(grad[:, grad.shape[1] - grid[0] * grid[1] :].abs().sum())


def default_target(probe: Probe) -> TargetLayer:
    """The last spatial feature map before the pooling head (see module docstring)."""
    outputs = [r for r in probe.records if r.point == "output"]
    pools = [
        r for r in probe.records
        if r.point == "input" and _spatial(r.shape) > 1 and _pooled_globally(probe, r)
    ]
    if pools:
        pool = pools[-1]
        same = [r for r in outputs if r.tensor is pool.tensor and r.order < pool.order and r.calls == 1]
        return target_for(probe, same[-1] if same else pool)
    spatial = [r for r in outputs if _spatial(r.shape) > 1 and not r.is_pooling]
    last_spatial = spatial[-1].order if spatial else -1
    tokens = []
    for r in outputs:
        if len(r.shape) == 3 and r.order > last_spatial and r.calls == 1:
            grid = _grid_before(probe, r)
            if grid is not None and _patch_gradient(r, grid) > 0:
                tokens.append(r)
    if tokens:
        return target_for(probe, tokens[-1])
    if spatial:
        return target_for(probe, spatial[-1])
    raise ModelError("cannot find a spatial feature map in this model; name one with --layer")


def _pooled_globally(probe: Probe, pool_input: Record) -> bool:
    out = [r for r in probe.records if r.name == pool_input.name and r.point == "output" and r.order > pool_input.order]
    return bool(out) and _spatial(out[0].shape) <= 1


def resolve_target(probe: Probe, layer: str | None) -> TargetLayer:
    """``--layer`` (``NAME`` or ``NAME:input``), or the default target."""
    if layer is None:
        return default_target(probe)
    name, _, point = layer.partition(":")
    if name not in probe.modules or not name:
        import difflib

        close = difflib.get_close_matches(name, [n for n in probe.modules if n], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown layer {layer!r}{hint}; `camx layers MODEL` lists the layers")
    if point not in ("", "input", "output"):
        raise ModelError(f"layer {layer!r}: the part after ':' must be 'input' or 'output'")
    point = point or "output"
    record = probe.find(name if point == "output" else f"{name}:input")
    if record is None and point == "input":
        # inputs are recorded for pooling modules only; take the producer's output instead
        raise ModelError(f"layer {layer!r}: ':input' is available for pooling modules only")
    if record is None:
        raise ModelError(f"layer {name!r} is not used by the forward pass, or gives no tensor feature map")
    return target_for(probe, record)


@dataclass
class CamHead:
    """What CAM needs from a GAP + linear head."""

    weight: torch.Tensor  # (C, K)
    pre_activation: Callable[[torch.Tensor], torch.Tensor] | None


def _head_description(probe: Probe, target: TargetLayer) -> str:
    """The leaf modules that run after the target layer, e.g. ``Linear -> Tanh -> Linear``."""
    record = probe.find(target.label)
    start = record.order if record is not None else 0
    after = [name for order, name in probe.leaf_calls if order > start]
    types = [type(probe.modules[n]).__name__ for n in after]
    return " -> ".join(types[-8:]) if types else "made of functional operations only"


def cam_head(probe: Probe, target: TargetLayer) -> CamHead:
    """Check that the logits are ``W @ GAP(A) + b``; raise ``ModelError`` naming the head if not."""
    record = probe.find(target.label)
    if record is None:
        raise ModelError(f"layer {target.label} was not seen by the probe")
    message = (
        "CAM needs a head of global average pooling then one linear layer after the target "
        f"layer {target.label}, but this model's head is {{}}; use --method gradcam"
    )
    if target.layout == "tokens":
        raise ModelError(message.format("a token sequence (a transformer)"))
    features = to_feature_map(record.tensor.detach(), target).float()
    logits = probe.logits.float()
    linears = [m for m in probe.modules.values() if isinstance(m, nn.Linear) and m.out_features == logits.shape[1]]
    candidates: list[tuple[Callable[[torch.Tensor], torch.Tensor] | None, torch.Tensor]] = [
        (None, features),
        (torch.relu, torch.relu(features)),
    ]
    tolerance = 1e-4 + 1e-3 * float(logits.abs().max())
    for linear in reversed(linears):
        if linear.in_features != features.shape[1]:
            continue
        for activation, mapped in candidates:
            predicted = F.linear(mapped.mean(dim=(2, 3)), linear.weight.float(), None if linear.bias is None else linear.bias.float())
            if float((predicted - logits).abs().max()) <= tolerance:
                return CamHead(linear.weight.detach().float().clone(), activation)
    raise ModelError(message.format(_head_description(probe, target)))


@dataclass
class LayerRow:
    label: str
    module_type: str
    shape: tuple[int, ...]
    is_default: bool


def list_layers(probe: Probe) -> list[LayerRow]:
    """Every module output that can serve as ``--layer``, in execution order."""
    try:
        default = default_target(probe).label
    except ModelError:
        default = ""
    rows: dict[str, LayerRow] = {}
    for r in probe.records:
        if len(r.shape) in (3, 4):
            rows[r.label] = LayerRow(r.label, r.module_type, r.shape, r.label == default)
    return sorted(rows.values(), key=lambda row: probe.find(row.label).order)  # type: ignore[union-attr]
