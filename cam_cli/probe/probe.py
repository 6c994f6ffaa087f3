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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from cam_cli.errors import ModelError
from cam_cli.models import Classifier
from cam_cli.probe.capture import Layout

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


#: whole transformer blocks whose class name says "Attention" (OpenAI's and open_clip's CLIP)
TRANSFORMER_BLOCKS = ("ResidualAttentionBlock",)


def _is_attention(name: str, module: nn.Module) -> bool:
    """An attention module (timm's ``Attention``, transformers' ``ViTSelfAttention``, ``blocks.0.attn``...)."""
    kind = type(module).__name__
    return kind not in TRANSFORMER_BLOCKS and (
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


def spatial_size(shape: tuple[int, ...], layout: Layout) -> tuple[int, int]:
    if len(shape) != 4:
        return (0, 0)
    return (shape[1], shape[2]) if layout == "nhwc" else (shape[2], shape[3])


def spatial_positions(record: Record) -> int:
    if not record.is_map:
        return 0
    h, w = spatial_size(record.shape, record.layout)
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
    h, w = spatial_size(shape, layout)
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


class _Watcher:
    """The probe's forward hooks and what they record, in the order the modules finish."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.records: list[Record] = []
        self.calls: list[Call] = []
        self.counts: dict[str, int] = {}
        self.conv_inputs: list[tuple[int, int, torch.Tensor, int]] = []
        self.linears: list[Head] = []
        self.pooled: dict[str, int] = {}
        self._nchw_ids: set[int] = set()
        self._token_shapes: list[tuple[int, ...]] = []
        self._attention = {name for name, module in modules.items() if name and _is_attention(name, module)}

    def attach(self, modules: dict[str, nn.Module]) -> list[Any]:
        """Hook every named module (and the input of every pooling module); the handles to remove."""
        handles = []
        for name, module in modules.items():
            if not name:
                continue
            try:
                handles.append(module.register_forward_hook(self._on_output(name, module)))
                if _is_pooling(module):
                    handles.append(module.register_forward_pre_hook(self._on_input(name, module)))
            except (RuntimeError, AttributeError):  # TorchScript submodules take no hooks
                continue
        return handles

    def _inside_attention(self, name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in self._attention for i in range(1, len(parts)))

    def _record(self, name: str, point: Literal["output", "input"], module: nn.Module, x: torch.Tensor,
                leaf: bool, calls_so_far: int) -> Record:  # fmt: skip
        shape = tuple(x.shape)
        known = id(x) in self._nchw_ids
        layout: Layout = "nchw" if known else _guess_layout(shape)
        is_map = _is_map(shape, layout, known, self._token_shapes) if len(shape) == 4 else shape[0] == PROBE_BATCH
        if len(shape) == 3:
            self._token_shapes.append(shape)
        return Record(
            name, point, type(module).__name__, shape, len(self.records) + len(self.calls), x,
            is_pooling=_is_pooling(module), is_leaf=leaf, calls=calls_so_far, layout=layout, version=x._version,
            is_map=is_map, in_attention=self._inside_attention(name),
        )  # fmt: skip

    def _on_output(self, name: str, module: nn.Module) -> Callable[..., None]:
        leaf = not any(module.children())
        weight = _linear_weight(module)
        pooling = _is_pooling(module)

        def hook(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.counts[name] = self.counts.get(name, 0) + 1
            order = len(self.records) + len(self.calls)
            if leaf:
                self.calls.append(Call(name, type(module).__name__, order))
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if not isinstance(output, torch.Tensor):
                return
            if pooling:
                self.pooled[name] = _pooled_size(tuple(output.shape))
            if isinstance(module, NCHW_MODULES):
                self._nchw_ids.add(id(output))
                if isinstance(module, nn.Conv2d) and first is not None and first.dim() == 4:
                    self.conv_inputs.append((order, module.out_channels, first, first._version))
            if weight is not None and first is not None and first.dim() == 2 and output.dim() == 2:
                bias = module._parameters.get("bias", getattr(module, "bias", None))
                self.linears.append(Head(name, weight, bias if isinstance(bias, torch.Tensor) else None, first, output))
            if output.dim() >= 3:
                if output.requires_grad and output.dim() in (3, 4):
                    # which tokens reach the head (token models); whether the output depends on a layer
                    output.retain_grad()
                self.records.append(self._record(name, "output", module, output, leaf, self.counts[name]))

        return hook

    def _on_input(self, name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
                if args[0].requires_grad:
                    args[0].retain_grad()
                self.records.append(self._record(name, "input", module, args[0], True, 1))

        return hook


def _probe_input(size: int, channels_last: bool, generator: torch.Generator) -> torch.Tensor:
    """The probe's seeded random image ``(1, 3, size, size)``, requiring a gradient."""
    x = torch.randn(1, 3, size, size, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(True)


def _forward(classifier: Classifier, x: torch.Tensor, linears: list[Head],
             generator: torch.Generator) -> tuple[torch.Tensor, Head | None, torch.Tensor | None]:  # fmt: skip
    """The hooked forward pass: the logits ``(1, C)``, the head that gave them, and the
    scalar to run the backward pass from (``None`` when nothing needs a gradient)."""
    size = x.shape[-1]
    root = None
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
    return logits, head, root


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
    modules = dict(model.named_modules())
    watcher = _Watcher(modules)
    handles = watcher.attach(modules)
    generator = torch.Generator().manual_seed(0)
    x = _probe_input(size, channels_last, generator)
    try:
        logits, head, root = _forward(classifier, x, watcher.linears, generator)
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
        watcher.records, logits.detach(), size, modules, watcher.calls, watcher.counts, watcher.conv_inputs, head,
        forward=classifier.logits, input=x.detach(), pooled=watcher.pooled,
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
