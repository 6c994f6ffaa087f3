"""Find target layers from a model's own structure, by watching one forward pass.

The probe runs a single random image through the model with a hook on every
module and records what each module returns, what enters each pooling module
and each convolution, and the order in which the modules finish.  From that
record:

* the default target is the tensor that enters the *global* pooling module,
  named after the outermost module that produced it (``layer4``, ``features``);
  when the pooled maps are themselves the logits (SqueezeNet's convolutional
  classifier), the channels there are class scores, not features, so the
  target steps back to the tensor entering that classifier convolution;
* a global pooling module is torch's or any module whose class name says
  ``Pool`` (timm's ``SelectAdaptivePool2d``), whatever layout it pools;
* without a global pooling module: for token models (ViT), the last token
  sequence whose patch tokens still reach the head, read on the patch grid of
  the last spatial map before it (the patch embedding), or on a square grid at a
  power-of-two stride (Swin, LeViT); else the last spatial feature map;
* never: a 4-D tensor that is not one image's map -- an attention's per-head
  ``(N, heads, T, d)`` tensors or ``(N, heads, T, T)`` attention matrices, window
  partitions ``(N * windows, ...)`` -- nor, by default, anything inside an
  attention module (its q/k/v projections); token sequences keep the model's
  own prefix tokens in front (timm's ``num_prefix_tokens``: class, distillation
  and register tokens), and a global pooling fed a 1x1 map is refused;
* a target produced by a ``Permute`` to NCHW (torchvision's Swin) is named after
  the channels-last layer it permutes (``norm``), read channels-last;
* CAM applies when the logits are ``W @ mean_ij(A) + b``: the module that
  produced the logits behaves as a linear layer and its input equals the
  spatial mean of the target activation (or of its ReLU, for DenseNet),
  checked on the probe's own tensors, whatever the weights are.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cam_cli.errors import ModelError
from cam_cli.methods.base import ActivationCapture, Layout, TargetLayer, resolve_module
from cam_cli.models import Classifier

POOLING = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d)
# Modules whose 4-D outputs are NCHW by construction.
NCHW_MODULES = (nn.Conv2d, nn.ConvTranspose2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, *POOLING)
MAX_EXTRA_TOKENS = 8
HEAD_SHOWN = 8
PROBE_BATCH = 1


def _is_pooling(module: nn.Module) -> bool:
    """torch's pooling modules, and pooling modules of model zoos (timm's ``SelectAdaptivePool2d``...)."""
    return isinstance(module, POOLING) or "Pool" in type(module).__name__


ATTENTION_PARTS = ("attn", "attention", "self_attn", "mha")


def _is_attention(name: str, module: nn.Module) -> bool:
    """An attention module (timm's ``Attention``, transformers' ``ViTSelfAttention``, ``blocks.0.attn``...)."""
    kind = type(module).__name__
    return (
        "Attention" in kind
        or "Attn" in kind
        or kind.endswith(("MHA", "MHSA", "GPSA"))
        or name.rsplit(".", 1)[-1].lower() in ATTENTION_PARTS
    )


@dataclass
class Record:
    """One module output (or pooling input) of three or more dimensions seen by the probe."""

    name: str
    point: Literal["output", "input"]
    module_type: str
    shape: tuple[int, ...]
    order: int
    tensor: torch.Tensor = field(repr=False)
    is_pooling: bool = False
    is_leaf: bool = True
    calls: int = 1
    layout: Layout = "nchw"
    version: int = 0
    #: False for 4-D tensors that are not (N, C, h, w) or (N, h, w, C) maps of one image: an
    #: attention's per-head (N, heads, T, d) tensors, window partitions (N * windows, ...)
    is_map: bool = True
    #: inside an attention module (its q/k/v projections): never a default target
    in_attention: bool = False

    @property
    def label(self) -> str:
        return self.name if self.point == "output" else f"{self.name}:input"


@dataclass
class Call:
    """One leaf module call, whatever it returned (for describing heads)."""

    name: str
    module_type: str
    order: int


@dataclass
class Head:
    """The last call of a linear-like module (a 2-D ``weight``) that gave ``(N, C)``."""

    name: str
    weight: torch.Tensor = field(repr=False)  # (C, K)
    bias: torch.Tensor | None = field(repr=False)
    input: torch.Tensor = field(repr=False)  # (N, K)
    output: torch.Tensor = field(repr=False)  # (N, C)


@dataclass
class Probe:
    records: list[Record]
    logits: torch.Tensor
    input_size: int
    modules: dict[str, nn.Module]
    calls: list[Call] = field(default_factory=list)
    call_counts: dict[str, int] = field(default_factory=dict)
    conv_inputs: list[tuple[int, int, torch.Tensor, int]] = field(default_factory=list)
    head: Head | None = None
    forward: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    input: torch.Tensor | None = field(default=None, repr=False)
    #: spatial size (h * w) of each pooling module's output; 1 for a flattened (N, C) output
    pooled: dict[str, int] = field(default_factory=dict)
    #: the model's own count of tokens in front of the patch tokens (timm's ``num_prefix_tokens``)
    prefix_tokens: int | None = None
    #: the scalar whose backward pass is the probe's, until that pass has run (see ``backward``)
    root: torch.Tensor | None = field(default=None, repr=False)

    def backward(self) -> None:
        """The probe's backward pass, run on first need only: it costs about a forward
        pass, and convolutional models with a pooling head never need it."""
        root, self.root = self.root, None
        if root is None:
            return
        try:
            root.backward()
        except Exception as exc:
            message = " ".join(str(exc).split())[:240]
            raise ModelError(f"the model's backward pass fails on a {self.input_size}x{self.input_size} input: "
                             f"{message}") from None  # fmt: skip

    def reaches(self, record: Record) -> bool:
        """Whether the probe's backward pass reaches ``record`` (so that its gradient is
        defined), found by running only the part of that pass between the root and it."""
        if self.root is None:
            return record.tensor.grad is not None
        if not record.tensor.requires_grad:
            return False
        try:
            (grad,) = torch.autograd.grad(self.root, record.tensor, retain_graph=True, allow_unused=True)
        except RuntimeError:
            return False  # the dry run then names what fails
        return grad is not None

    def find(self, label: str) -> Record | None:
        for record in reversed(self.records):
            if record.label == label:
                return record
        return None


def _guess_layout(shape: tuple[int, ...]) -> Layout:
    # The probe's input is square: NCHW has h == w at dims 2, 3; channels-last at 1, 2.
    if len(shape) == 4 and shape[2] != shape[3] and shape[1] == shape[2]:
        return "nhwc"
    return "nchw"


def _spatial_size(shape: tuple[int, ...], layout: Layout) -> tuple[int, int]:
    if len(shape) != 4:
        return (0, 0)
    return (shape[1], shape[2]) if layout == "nhwc" else (shape[2], shape[3])


def _spatial(record: Record) -> int:
    if not record.is_map:
        return 0
    h, w = _spatial_size(record.shape, record.layout)
    return h * w


def _is_map(shape: tuple[int, ...], layout: Layout, nchw_module: bool, tokens: list[tuple[int, ...]]) -> bool:
    """Whether a 4-D tensor of the probe's square input reads as one image's feature map.

    Not: a batch other than the probe's (window partitions); a non-square grid
    in either layout (``(N, heads, T, d)``); an attention's per-head split of
    a token sequence seen just before (``T`` tokens, and ``heads * d == D``),
    or its attention matrix ``(N, heads, T, T)``.
    """
    if len(shape) != 4 or shape[0] != PROBE_BATCH:
        return False
    if nchw_module:
        return True
    h, w = _spatial_size(shape, layout)
    if h != w:
        return False
    _, heads, t, d = shape
    return t <= 1 or not any(s[1] == t and (heads * d == s[2] or d == t) for s in tokens[-8:])


def _linear_weight(module: nn.Module) -> torch.Tensor | None:
    weight = module._parameters.get("weight")
    if weight is None:
        weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _pooled_size(shape: tuple[int, ...]) -> int:
    """h * w of a pooling module's output: 1 for ``(N, C)``, ``(N, C, 1, 1)`` or ``(N, 1, 1, C)``."""
    if len(shape) <= 2:
        return 1
    if len(shape) == 4:
        return 1 if shape[2] * shape[3] == 1 or shape[1] * shape[2] == 1 else shape[2] * shape[3]
    return -1


def run_probe(classifier: Classifier, input_size: int | None = None, channels_last: bool = False) -> Probe:
    """One forward pass of a seeded random image, on the CPU, and the graph for a backward pass.

    The backward pass (``Probe.backward``, run when first needed) starts from
    a random projection of the head's input (or from the top logit when the
    head is not a linear layer), so that which tokens reach the head does not
    depend on the head's weights (torchvision initialises ViT's head to zero).
    With ``channels_last`` the image is in that memory format (the model should
    be too), so that the run's first pass finds oneDNN's kernels prepared.
    """
    model = classifier.module
    size = input_size or classifier.input_size
    records: list[Record] = []
    calls: list[Call] = []
    counts: dict[str, int] = {}
    conv_inputs: list[tuple[int, int, torch.Tensor, int]] = []
    linears: list[Head] = []
    nchw_ids: set[int] = set()
    handles = []
    modules = dict(model.named_modules())
    pooled: dict[str, int] = {}
    token_shapes: list[tuple[int, ...]] = []
    attention = {name for name, module in modules.items() if name and _is_attention(name, module)}

    def inside_attention(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in attention for i in range(1, len(parts)))

    def record(name: str, point: Literal["output", "input"], module: nn.Module, x: torch.Tensor, leaf: bool,
               calls_so_far: int) -> Record:  # fmt: skip
        shape = tuple(x.shape)
        known = id(x) in nchw_ids
        layout: Layout = "nchw" if known else _guess_layout(shape)
        is_map = _is_map(shape, layout, known, token_shapes) if len(shape) == 4 else shape[0] == PROBE_BATCH
        if len(shape) == 3:
            token_shapes.append(shape)
        return Record(
            name, point, type(module).__name__, shape, len(records) + len(calls), x,
            is_pooling=_is_pooling(module), is_leaf=leaf, calls=calls_so_far, layout=layout, version=x._version,
            is_map=is_map, in_attention=inside_attention(name),
        )  # fmt: skip

    def on_output(name: str, module: nn.Module) -> Callable[..., None]:
        leaf = not any(module.children())
        weight = _linear_weight(module)
        pooling = _is_pooling(module)

        def hook(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            counts[name] = counts.get(name, 0) + 1
            order = len(records) + len(calls)
            if leaf:
                calls.append(Call(name, type(module).__name__, order))
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if not isinstance(output, torch.Tensor):
                return
            if pooling:
                shape = tuple(output.shape)
                pooled[name] = _pooled_size(shape)
            if isinstance(module, NCHW_MODULES):
                nchw_ids.add(id(output))
                if isinstance(module, nn.Conv2d) and first is not None and first.dim() == 4:
                    conv_inputs.append((order, module.out_channels, first, first._version))
            if weight is not None and first is not None and first.dim() == 2 and output.dim() == 2:
                bias = module._parameters.get("bias", getattr(module, "bias", None))
                linears.append(Head(name, weight, bias if isinstance(bias, torch.Tensor) else None, first, output))
            if output.dim() >= 3:
                if output.requires_grad and output.dim() in (3, 4):
                    # which tokens reach the head (token models); whether the output depends on a layer
                    output.retain_grad()
                records.append(record(name, "output", module, output, leaf, counts[name]))

        return hook

    def on_input(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
                if args[0].requires_grad:
                    args[0].retain_grad()
                records.append(record(name, "input", module, args[0], True, 1))

        return hook

    for name, module in modules.items():
        if not name:
            continue
        try:
            handles.append(module.register_forward_hook(on_output(name, module)))
            if _is_pooling(module):
                handles.append(module.register_forward_pre_hook(on_input(name, module)))
        except (RuntimeError, AttributeError):  # TorchScript submodules take no hooks
            continue
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    root = None
    try:
        with torch.enable_grad():
            logits = classifier.logits(x)
            if logits.dim() != 2:
                raise ModelError(f"the model's logits have shape {tuple(logits.shape)}, expected (N, classes)")
            if not bool(torch.isfinite(logits).all()):
                raise ModelError(
                    f"{classifier.name} gives non-finite logits (NaN or inf) on a random {size}x{size} input; "
                    "check --weights"
                )
            head = _final_linear(linears, logits)
            if head is not None and head.input.requires_grad:
                direction = torch.randn(head.input.shape, generator=generator)
                root = (head.input * direction).sum()
            elif logits.requires_grad:
                root = logits[0, int(logits[0].argmax())]
    except ModelError:
        raise
    except Exception as exc:
        message = " ".join(str(exc).split())[:240]
        raise ModelError(f"{classifier.name} fails on a {size}x{size} input: {message}") from None
    finally:
        for handle in handles:
            handle.remove()
    prefix = getattr(model, "num_prefix_tokens", None)
    return Probe(
        records, logits.detach(), size, modules, calls, counts, conv_inputs, head,
        forward=classifier.logits, input=x.detach(), pooled=pooled,
        prefix_tokens=prefix if isinstance(prefix, int) and not isinstance(prefix, bool) else None, root=root,
    )  # fmt: skip


def _final_linear(linears: list[Head], logits: torch.Tensor) -> Head | None:
    """The linear-like call whose output is the logits (the same tensor, or equal to it)."""
    for head in reversed(linears):
        if head.output is logits:
            return head
    for head in reversed(linears):
        if head.output.shape == logits.shape and torch.equal(head.output.detach(), logits.detach()):
            return head
    return None


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
        if earlier.order < record.order and len(earlier.shape) == 4 and _spatial(earlier) > 1:
            gh, gw = _spatial_size(earlier.shape, earlier.layout)
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
        if r.point != "input" or _spatial(r) <= 1 or probe.call_counts.get(r.name, 1) > 1:
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
            and _spatial(earlier) > 1
            and probe.call_counts.get(earlier.name, 1) == 1
            and earlier.tensor.shape == record.tensor.permute(0, 2, 3, 1).shape
            and torch.equal(earlier.tensor.detach().permute(0, 3, 1, 2), record.tensor.detach())
        ):
            return earlier
    return record


def _refuse_a_pooled_point(probe: Probe) -> None:
    """A global pooling module that receives a 1x1 map: the input is too small to localise anything."""
    for r in probe.records:
        if r.point == "input" and len(r.shape) == 4 and _spatial(r) == 1 and probe.pooled.get(r.name) == 1:
            raise ModelError(
                f"at {probe.input_size}x{probe.input_size} inputs the feature map entering the global pooling "
                f"({r.name}) is 1x1, so there is nothing to localise; use a larger --input-size"
            )


def _candidate(probe: Probe, r: Record) -> bool:
    return r.point == "output" and probe.call_counts.get(r.name, 1) == 1 and not r.in_attention


def default_target(probe: Probe) -> TargetLayer:
    """The last spatial feature map before the pooling head (see the module docstring)."""
    _refuse_a_pooled_point(probe)
    pooled = _global_pool_input(probe)
    if pooled is not None:
        pool, pool_out = pooled
        source = _class_map_input(probe, pool, pool_out)
        if source is not None:
            tensor, version, order = source
            record = _producer(probe, tensor, version, order)
            if record is not None and _spatial(record) > 1:
                return target_for(probe, _unpermuted(probe, record))
        record = _producer(probe, pool.tensor, pool.version, pool.order)
        return target_for(probe, _unpermuted(probe, record) if record is not None else pool)
    classes = int(probe.logits.shape[1])
    outputs = [r for r in probe.records if _candidate(probe, r)]
    spatial = [r for r in outputs if _spatial(r) > 1 and not r.is_pooling]
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
        close = difflib.get_close_matches(name, [n for n in probe.modules if n], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
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
        raise ModelError(f"layer {name!r} is not used by the forward pass, or gives no tensor feature map")
    return target_for(probe, record)


@dataclass
class CamHead:
    """What CAM needs from a GAP + linear head."""

    weight: torch.Tensor  # (C, K)
    pre_activation: Callable[[torch.Tensor], torch.Tensor] | None


def head_description(probe: Probe, target: TargetLayer) -> str:
    """The leaf modules that run after ``target``, e.g. ``AdaptiveAvgPool2d -> Flatten -> Linear``."""
    record = probe.find(target.label)
    start = record.order if record is not None else -1
    types = [c.module_type for c in probe.calls if c.order > start]
    if not types:
        return "no modules (only functional operations)"
    shown = " -> ".join(types[-HEAD_SHOWN:])
    return shown if len(types) <= HEAD_SHOWN else f"... -> {shown}"


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
        raise ModelError(message.format(f"a transformer's, on tokens ({head_description(probe, target)})"))
    head = probe.head
    if head is not None and probe.forward is not None and probe.input is not None:
        # Run again with the capture CAM uses: the probe's own records may have been
        # changed in place after their hook ran (DenseNet's F.relu(features, inplace=True)).
        seen: list[torch.Tensor] = []
        model = probe.modules[""]
        handle = resolve_module(model, head.name).register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
        try:
            device = next((p.device for p in model.parameters()), probe.input.device)  # the pipeline may have moved it
            with torch.inference_mode(), ActivationCapture(model, target, False) as capture:
                logits = probe.forward(probe.input.to(device)).float()
                features = capture.feature_map().float()
        finally:
            handle.remove()
        z, weight = seen[-1].float(), head.weight.detach().float()
        bias = None if head.bias is None else head.bias.detach().float()
        atol = 1e-5 * (float(z.abs().max()) + float(logits.abs().max()))
        if z.shape[1] == features.shape[1] and torch.allclose(F.linear(z, weight, bias), logits, 1e-4, atol):
            for activation in (None, torch.relu):
                mapped = features if activation is None else activation(features)
                if torch.allclose(mapped.mean(dim=(2, 3)), z, 1e-4, atol):
                    return CamHead(weight.clone(), activation)
    raise ModelError(message.format(head_description(probe, target)))


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
