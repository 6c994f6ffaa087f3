"""Choosing the target layer from what the probe saw: the default (the tensor
entering the global pooling, the last token sequence that reaches the head, or
the last spatial map), a ``--layer`` name resolved against the probe, and the
listing ``camx layers`` prints. The rules are in :mod:`cam_cli.probe.probe`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cam_cli.errors import ModelError, suggest
from cam_cli.probe.capture import TargetLayer
from cam_cli.probe.probe import MAX_EXTRA_TOKENS, Probe, Record, spatial_positions, spatial_size


def _extras(probe: Probe) -> list[int]:
    """How many tokens may stand in front of the patch tokens: the model's own count first."""
    own = [probe.prefix_tokens] if probe.prefix_tokens is not None else []
    return [*own, *(e for e in range(MAX_EXTRA_TOKENS + 1) if e not in own)]


def _square_grid(probe: Probe, tokens: int) -> tuple[int, int] | None:
    """A square patch grid for ``tokens`` (minus prefix tokens) at a power-of-two stride of the input."""
    for extra in _extras(probe):
        side = math.isqrt(max(tokens - extra, 0))
        if side >= 2 and side * side == tokens - extra:
            size = probe.input_size
            if any(side in (size // 2**k, -(-size // 2**k)) for k in range(1, 8)):
                return (side, side)
    return None


def _grid_before(probe: Probe, record: Record) -> tuple[int, int] | None:
    """The patch grid of a token record: the last spatial map computed before it (a patch
    embedding), with the model's prefix tokens (or a few) in front; else a square grid."""
    if not record.is_map or record.shape[2] <= 1:
        return None
    tokens = record.shape[1]
    for earlier in reversed(probe.records):
        if earlier.order < record.order and len(earlier.shape) == 4 and spatial_positions(earlier) > 1:
            gh, gw = spatial_size(earlier.shape, earlier.layout)
            if tokens - gh * gw in _extras(probe):
                return (gh, gw)
            break
    return _square_grid(probe, tokens)


def target_for(probe: Probe, record: Record) -> TargetLayer:
    """The ``TargetLayer`` that reads ``record`` as a feature map."""
    if len(record.shape) == 3:
        grid = _grid_before(probe, record)
        if grid is None:
            raise ModelError(
                f"layer {record.label} gives {record.shape[1]} tokens that do not form the model's "
                "patch grid; choose another --layer"
            )
        return TargetLayer(record.name, record.point, "tokens", grid)
    if len(record.shape) == 4 and record.is_map:
        return TargetLayer(record.name, record.point, record.layout)
    if len(record.shape) == 4:
        raise ModelError(
            f"layer {record.label} gives {record.shape}, which is not one image's feature map (an attention "
            "module's per-head or per-window tensor); choose another --layer (`camx layers MODEL`)"
        )
    raise ModelError(f"layer {record.label} has shape {record.shape}, not a feature map")


def _patch_gradient(probe: Probe, record: Record, grid: tuple[int, int]) -> float:
    probe.backward()
    grad = record.tensor.grad
    if grad is None:
        return 0.0
    return float(grad[:, grad.shape[1] - grid[0] * grid[1] :].abs().sum())


def _is_ancestor(parent: str, child: str) -> bool:
    return child.startswith(parent + ".")


def _producer(probe: Probe, tensor: torch.Tensor, version: int, before: int) -> Record | None:
    """The record that names ``tensor`` (as it was at ``version``): the outermost module
    that returned it, among those whose output already held its final values (so an
    in-place ReLU counts and an eval-time Dropout that passes it on does not)."""
    same = [
        r
        for r in probe.records
        if r.point == "output"
        and r.order < before
        and r.tensor is tensor
        and r.version == version
        and probe.call_counts.get(r.name, 1) == 1
    ]
    if not same:
        return None
    first = same[0]
    outer = [r for r in same if r is first or _is_ancestor(r.name, first.name)]
    return min(outer, key=lambda r: r.name.count("."))


def _global_pool_input(probe: Probe) -> tuple[Record, Record | None] | None:
    """The last pooling input that is pooled to 1x1, with the pooling's recorded output (None when it
    gave a flat ``(N, C)``, as timm's ``SelectAdaptivePool2d`` does)."""
    found = None
    for i, r in enumerate(probe.records):
        if r.point != "input" or spatial_positions(r) <= 1 or probe.call_counts.get(r.name, 1) > 1:
            continue
        if probe.pooled.get(r.name, -1) == 1:
            out = next((o for o in probe.records[i + 1 :] if o.name == r.name and o.point == "output"), None)
            found = (r, out)
    return found


def _class_map_input(probe: Probe, pool: Record, pooled: Record | None) -> tuple[torch.Tensor, int, int] | None:
    """When the pooled maps are the logits, the input of the convolution that made the class maps."""
    if pooled is None:
        return None
    logits = probe.logits
    flat = pooled.tensor.detach().flatten(1)
    if flat.shape != logits.shape or not torch.allclose(flat, logits, rtol=1e-5, atol=1e-6):
        return None
    convs = [c for c in probe.conv_inputs if c[0] < pool.order and c[1] == logits.shape[1]]
    if not convs:
        return None
    order, _, tensor, version = convs[-1]
    return tensor, version, order


def _unpermuted(probe: Probe, record: Record) -> Record:
    """The channels-last tensor that a ``Permute`` module (torchvision's Swin) turned into NCHW, so
    that the target is named after the layer that computed it (``norm``, read channels-last)."""
    module = probe.modules.get(record.name)
    if list(getattr(module, "dims", ()) or ()) != [0, 3, 1, 2]:
        return record
    for earlier in reversed(probe.records):
        if (
            earlier.order < record.order
            and earlier.point == "output"
            and earlier.layout == "nhwc"
            and spatial_positions(earlier) > 1
            and probe.call_counts.get(earlier.name, 1) == 1
            and earlier.tensor.shape == record.tensor.permute(0, 2, 3, 1).shape
            and torch.equal(earlier.tensor.detach().permute(0, 3, 1, 2), record.tensor.detach())
        ):
            return earlier
    return record


def _refuse_a_pooled_point(probe: Probe) -> None:
    """A global pooling module that receives a 1x1 map: the input is too small to localise anything."""
    for r in probe.records:
        if r.point == "input" and len(r.shape) == 4 and spatial_positions(r) == 1 and probe.pooled.get(r.name) == 1:
            raise ModelError(
                f"at {probe.input_size}x{probe.input_size} inputs the feature map entering the global pooling "
                f"({r.name}) is 1x1, so there is nothing to localise; use a larger --input-size"
            )


def _candidate(probe: Probe, r: Record) -> bool:
    return r.point == "output" and probe.call_counts.get(r.name, 1) == 1 and not r.in_attention


def backbone_stage(probe: Probe) -> str | None:
    """The last stage of a torchvision segmentation model's backbone (``backbone.layer4``,
    ``backbone.16``): the deepest features the dense head reads, at the head's resolution. Its
    head's own output is class scores per pixel, not features, so the structural rule below
    (the last spatial map) would pick the logits. None for a model of another shape."""
    from torchvision.models._utils import IntermediateLayerGetter

    backbone = probe.modules.get("backbone")
    if not isinstance(backbone, IntermediateLayerGetter):
        return None
    stages = [name for name, _ in backbone.named_children()]
    return f"backbone.{stages[-1]}" if stages else None


def default_target(probe: Probe) -> TargetLayer:
    """The last spatial feature map before the pooling head (see the module docstring), or
    the last stage of a segmentation model's backbone (:func:`backbone_stage`)."""
    stage = backbone_stage(probe)
    if stage is not None:
        return resolve_target(probe, stage)
    _refuse_a_pooled_point(probe)
    pooled = _global_pool_input(probe)
    if pooled is not None:
        pool, pool_out = pooled
        source = _class_map_input(probe, pool, pool_out)
        if source is not None:
            tensor, version, order = source
            record = _producer(probe, tensor, version, order)
            if record is not None and spatial_positions(record) > 1:
                return target_for(probe, _unpermuted(probe, record))
        record = _producer(probe, pool.tensor, pool.version, pool.order)
        return target_for(probe, _unpermuted(probe, record) if record is not None else pool)
    classes = int(probe.logits.shape[1])
    outputs = [r for r in probe.records if _candidate(probe, r)]
    spatial = [r for r in outputs if spatial_positions(r) > 1 and not r.is_pooling]
    last_spatial = spatial[-1].order if spatial else -1
    tokens = []
    for r in outputs:
        # per-token class scores (VOLO's aux_head) are not features
        scores = r.shape[2] == classes and isinstance(probe.modules.get(r.name), nn.Linear)
        if len(r.shape) == 3 and r.order > last_spatial and not scores:
            grid = _grid_before(probe, r)
            if grid is not None and _patch_gradient(probe, r, grid) > 0:
                tokens.append(r)
    if tokens:
        return target_for(probe, tokens[-1])
    if spatial:
        return target_for(probe, _unpermuted(probe, spatial[-1]))
    raise ModelError("cannot find a spatial feature map in this model; name one with --layer")


def resolve_target(probe: Probe, layer: str | None) -> TargetLayer:
    """``--layer`` (``NAME`` or ``NAME:input``), or the default target."""
    if layer is None:
        return default_target(probe)
    name, _, point = layer.partition(":")
    if name not in probe.modules or not name:
        hint = suggest(name, [n for n in probe.modules if n])
        raise ModelError(f"unknown layer {layer!r}{hint}; `camx layers MODEL` lists the layers")
    if point not in ("", "input", "output"):
        raise ModelError(f"layer {layer!r}: the part after ':' must be 'input' or 'output'")
    point = point or "output"
    if probe.call_counts.get(name, 1) > 1:
        raise ModelError(
            f"layer {name!r} runs {probe.call_counts[name]} times in one forward pass, so its activation is "
            "ambiguous; choose a layer that runs once (`camx layers MODEL`)"
        )
    record = probe.find(name if point == "output" else f"{name}:input")
    if record is None and point == "input":
        raise ModelError(f"layer {layer!r}: ':input' is available for pooling modules only")
    if record is None:
        raise ModelError(_why_no_map(probe, name))
    return target_for(probe, record)


def resolve_targets(probe: Probe, layer: str | None) -> list[TargetLayer]:
    """``--layer`` as one or several comma-separated layers (each as :func:`resolve_target`),
    or the default target alone."""
    if layer is None:
        return [default_target(probe)]
    names = [part.strip() for part in layer.split(",")]
    if not all(names):
        raise ModelError(f"--layer {layer!r}: an empty layer name in the list")
    if len(set(names)) < len(names):
        raise ModelError(f"--layer {layer!r} names a layer twice")
    return [resolve_target(probe, name) for name in names]


def layers_label(targets: list[TargetLayer]) -> str:
    """The layers as ``--layer`` takes them and the manifest records them (``layer3,layer4``)."""
    return ",".join(t.label for t in targets)


def _why_no_map(probe: Probe, name: str) -> str:
    """What is wrong with ``--layer NAME`` whose output the probe did not record as a map."""
    after = "pick a layer before it, see `camx layers MODEL`"
    head = probe.head.name if probe.head is not None else None
    if head is not None and (head == name or head.startswith(name + ".")):
        what = "is the classifier head" if head == name else f"holds the classifier head {head}"
        return f"layer {name!r} {what} (its output is the logits, not a spatial map); {after}"
    if probe.call_counts.get(name, 0) == 0:
        return f"layer {name!r} is not used by the forward pass; `camx layers MODEL` lists the layers that are"
    return (
        f"layer {name!r} gives no spatial map (its output is a vector per image, or not a tensor, e.g. after "
        f"the global pooling); {after}"
    )


def _readable(probe: Probe, record: Record) -> bool:
    try:
        target_for(probe, record)
    except ModelError:
        return False
    return True


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
        # a module run more than once per forward (a shared ReLU) is ambiguous: --layer refuses it
        if len(r.shape) in (3, 4) and probe.call_counts.get(r.name, 1) == 1 and _readable(probe, r):
            rows[r.label] = LayerRow(r.label, r.module_type, r.shape, r.label == default)
    return sorted(rows.values(), key=lambda row: probe.find(row.label).order)  # type: ignore[union-attr]
