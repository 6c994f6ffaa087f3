"""Ablation-CAM (Desai & Ramaswamy, WACV 2020), as pytorch-grad-cam's ``AblationCAM``:
``y_k`` the logit with channel ``k`` of the target activation set to 0,
``w_k = (y_c - y_k) / y_c``. A perturbation method (see :mod:`cam_cli.methods.perturbation`
for how its passes are batched). Three ways to ``y_k``, all exact:

* **closed form**, where global average pooling and one linear layer follow the
  target (the CAM head check): ``y_c - y_k = W[c, k] * mean_ij(f(A_k))`` with ``f``
  the element-wise pre-activation between them (DenseNet's ReLU), no extra pass;
* **cut**: the model traced with ``torch.fx`` and split at the target; the part
  before it runs once per batch, the part after it once per ablated channel, on
  copies of the activation with one channel zeroed. Every other value that crosses
  the cut (a skip connection around the target) is carried along, per image;
* **full passes** where the model cannot be traced or split (``settings()``
  says why, and the manifest records it): the whole model runs on the image once
  per ablated channel, a forward hook zeroing the channel in the target's output.

Then, as every channel-weight method (``Method.maps``): ``sum_k w_k A_k`` or, with
``eigen_smooth``, its first principal component; then ReLU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from cam_cli.errors import ModelError
from cam_cli.methods.base import Capture, Method, Setup, Stopped, TargetLayer, resolve_module
from cam_cli.methods.perturbation import feature_channels, fill_scores, finish_stopped, standing_in, tick

#: the passes of the part after a cut take up to this many times ``--batch-size``
#: ablated copies at once, within this many bytes of them
TAIL_ROWS = 4
TAIL_BYTES = 256 * 2**20


class _PrefixDone(Exception):
    """Raised by the stand-in forward of ``_prefix`` once the part before the target has run."""


class CutError(Exception):
    """The network cannot be split at the target layer (the message says why)."""


def _channel_axis(target: TargetLayer) -> int:
    """The channel axis of the target's raw tensor: 1 for NCHW, the last for NHWC and tokens."""
    return 1 if target.layout == "nchw" else -1


def _zero_channels(batch: torch.Tensor, channel: torch.Tensor, axis: int) -> torch.Tensor:
    """Row ``j`` of ``batch`` with channel ``channel[j]`` (along ``axis``) set to 0, in place."""
    rows = torch.arange(batch.shape[0], device=batch.device)
    batch.movedim(axis, 1)[rows, channel.to(batch.device)] = 0
    return batch


class _Tracer(fx.Tracer):
    """torch.fx's tracer with the target module kept whole (one node)."""

    def __init__(self, keep: str) -> None:
        super().__init__()
        self.keep = keep

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self.keep or super().is_leaf_module(m, module_qualified_name)


@dataclass
class Cut:
    """The network split at the target layer.

    ``prefix(x)`` returns ``(*live, source)``: every value the part after the target
    needs from before it, and the tensor to ablate (the target's output, or for a
    ``:input`` target the tensor entering it). ``tail(*live, ablated)`` returns the
    model's output. ``batched[i]``: whether ``live[i]`` depends on the input (and so
    has one row per image).
    """

    prefix: fx.GraphModule
    tail: fx.GraphModule
    batched: list[bool]


def _trace(module: nn.Module, target: TargetLayer) -> tuple[list[fx.Node], int, fx.Node]:
    """The traced model's nodes, the position of the target's one call among them, and the
    model's input."""
    try:
        graph = _Tracer(target.name).trace(module)
    except Exception as exc:
        message = " ".join(str(exc).split())[:160]
        raise CutError(f"torch.fx cannot trace the model ({type(exc).__name__}: {message})") from None
    nodes = list(graph.nodes)
    calls = [i for i, node in enumerate(nodes) if node.op == "call_module" and node.target == target.name]
    if len(calls) != 1:
        raise CutError(f"layer {target.name} runs {len(calls)} times in the traced model, not once")
    placeholders = [node for node in nodes if node.op == "placeholder"]
    if not placeholders:
        raise CutError("the traced model takes no input")
    return nodes, calls[0], placeholders[0]


def _prefix_graph(before: list[fx.Node], live: list[fx.Node], source: fx.Node) -> fx.Graph:
    """The nodes ``before`` the cut, returning ``(*live, source)``."""
    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in before:
        env[node] = head.node_copy(node, lambda n: env[n])
    head.output((*(env[n] for n in live), env[source]))
    return head


def _tail_graph(before: list[fx.Node], after: list[fx.Node], live: list[fx.Node], call: fx.Node,
                target: TargetLayer) -> fx.Graph:  # fmt: skip
    """The nodes ``after`` the cut, taking ``(*live, ablated)``; ``ablated`` stands for the
    target's output, or for the first argument of its ``call`` (an ``:input`` target)."""
    later = set(after)
    rest = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in live:
        env[node] = rest.placeholder(f"live_{len(env)}")
    ablated = rest.placeholder("ablated")
    for node in before:
        if node.op == "get_attr" and any(user in later for user in node.users):
            env[node] = rest.node_copy(node, lambda n: env[n])
    if target.point == "output":
        env[call] = ablated
    for node in after:
        if node is call:  # an ``:input`` target: only its first argument is ablated
            args = (ablated, *fx.map_arg(call.args[1:], lambda n: env[n]))
            env[node] = rest.create_node("call_module", call.target, args, fx.map_arg(call.kwargs, lambda n: env[n]))
        else:
            env[node] = rest.node_copy(node, lambda n: env[n])
    return rest


def cut_at(module: nn.Module, target: TargetLayer) -> Cut:
    """Split ``module`` at ``target`` with torch.fx; :class:`CutError` says why it cannot be."""
    nodes, position, first = _trace(module, target)
    call = nodes[position]
    if target.point == "output":
        before, after, source = nodes[: position + 1], nodes[position + 1 :], call
    else:
        if not call.args or not isinstance(call.args[0], fx.Node):
            raise CutError(f"the input of {target.name} is not a traced value")
        before, after, source = nodes[:position], nodes[position:], call.args[0]
    depends: set[fx.Node] = {first}
    for node in nodes:
        if any(parent in depends for parent in node.all_input_nodes):
            depends.add(node)
    later = set(after)
    live = [
        node
        for node in before
        if node.op != "get_attr" and node is not call and any(user in later for user in node.users)
    ]
    head = _prefix_graph(before, live, source)
    rest = _tail_graph(before, after, live, call, target)
    try:
        cut = Cut(fx.GraphModule(module, head), fx.GraphModule(module, rest), [n in depends for n in live])
    except Exception as exc:
        raise CutError(f"the split network does not compile ({type(exc).__name__})") from None
    return cut


class AblationCAM(Method):
    """Desai & Ramaswamy 2020: ``w_k = (y_c - y_k) / y_c``, ``y_k`` with channel ``k`` of ``A`` set to 0."""

    name = "ablationcam"
    after_pass = True

    head_weight: torch.Tensor | None = None  # (C, K): the closed form
    pre_activation: Callable[[torch.Tensor], torch.Tensor] | None = None
    cut: Cut | None = None
    module: nn.Module | None = None
    target: TargetLayer | None = None
    mode: str = "full passes"

    def prepare(self, setup: Setup) -> None:
        from cam_cli.probe import cam_head

        if setup.target is None:
            raise ModelError("ablationcam needs a target layer")
        if len(setup.targets) > 1:
            raise ModelError("ablationcam ablates the channels of one layer; give one --layer for it")
        self.module, self.target = setup.module, setup.target
        resolve_module(setup.module, setup.target.name)
        self.passes_per_image = feature_channels(setup.probe, setup.target)  # none for the closed form
        try:
            head = cam_head(setup.probe, setup.target)
        except ModelError:
            pass
        else:
            self.head_weight = head.weight.to(setup.device).float()
            self.pre_activation = head.pre_activation
            self.mode = "closed form"
            self.passes_per_image = 0
            return
        try:
            self.cut = cut_at(setup.module, setup.target)
            probe_input = getattr(setup.probe, "input", None)
            if probe_input is not None:
                self._check_cut(setup, probe_input.to(setup.device), getattr(setup.probe, "logits", None))
        except CutError as exc:
            self.cut = None
            self.mode = f"full passes: {exc}"
        else:
            self.mode = f"cut at {setup.target.label}"

    def _check_cut(self, setup: Setup, x: torch.Tensor, logits: torch.Tensor | None) -> None:
        """The split network, unablated, must give the model's own ``logits`` on the probe's input ``x``."""
        assert self.cut is not None
        try:
            with torch.inference_mode():
                whole = setup.forward(x).float() if logits is None else logits.detach().float().to(x.device)
                live, source = self._prefix(setup.forward, x)
                for value, batched in zip(live, self.cut.batched, strict=True):
                    if batched and not (isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == len(x)):
                        kind = type(value).__name__ if not isinstance(value, torch.Tensor) else "a tensor without rows"
                        raise CutError(f"a {kind} value crosses the cut, not a tensor with one row per image")
                parts = self._tail(setup.forward, live, source, x).float()
        except CutError:
            raise
        except Exception as exc:
            raise CutError(
                f"the split network fails ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
            ) from None
        scale = float(whole.abs().max()) + 1.0
        if parts.shape != whole.shape or not torch.allclose(parts, whole, rtol=1e-3, atol=1e-3 * scale):
            raise CutError("the split network does not reproduce the model's logits")

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "ablation": self.mode}

    def _prefix(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[list[Any], Any]:
        """The part before the target on ``x``: ``(live values, the tensor to ablate)``."""
        assert self.cut is not None and self.module is not None
        kept: list[Any] = []

        def run(*_: Any, **__: Any) -> torch.Tensor:
            kept.extend(self.cut.prefix(x))  # type: ignore[union-attr]
            raise _PrefixDone  # nothing after the prefix runs (nor the readout of the output)

        with standing_in(self.module, run), contextlib.suppress(_PrefixDone):
            forward(x[:1])
        return kept[:-1], kept[-1]

    def _tail(self, forward: Callable[[torch.Tensor], torch.Tensor], live: list[Any], ablated: torch.Tensor,
              x: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The part after the target on ``live`` and ``ablated`` (rows already chosen): the logits."""
        assert self.cut is not None and self.module is not None
        with standing_in(self.module, lambda *_, **__: self.cut.tail(*live, ablated)):  # type: ignore[union-attr]
            return forward(x[:1])

    def maps(self, capture: Capture) -> torch.Tensor:
        y = capture.logits.gather(1, capture.classes)  # (N, R)
        if self.head_weight is not None:
            drop = self._closed_form(capture)
        else:
            try:
                drop = y[:, :, None] - self._ablated_scores(capture)
            except Stopped as stopped:  # the images whose passes are all done are finished all the same

                def keep(on: Capture, scores: torch.Tensor) -> None:
                    y_part = on.logits.gather(1, on.classes)
                    on._cache[(self.name, "weights")] = (y_part[:, :, None] - scores) / y_part[:, :, None]

                raise finish_stopped(self, capture, stopped, keep) from None
        capture._cache[(self.name, "weights")] = drop / y[:, :, None]
        return super().maps(capture)

    def weights(self, capture: Capture, r: int) -> torch.Tensor:
        return capture._cache[(self.name, "weights")][:, r]

    def _closed_form(self, capture: Capture) -> torch.Tensor:
        """``y_c - y_k = W[c, k] * (mean_ij f(A_k) - f(0))`` ``(N, R, K)``, no pass at all."""
        assert self.head_weight is not None
        features = capture.features
        if self.pre_activation is not None:
            pooled = self.pre_activation(features).mean(dim=(2, 3))
            pooled = pooled - self.pre_activation(torch.zeros((), device=features.device))
        else:
            pooled = features.mean(dim=(2, 3))
        weight = self.head_weight.to(features.device)[capture.classes]  # (N, R, K)
        return weight * pooled[:, None, :]

    def _ablated_scores(self, capture: Capture) -> torch.Tensor:
        """``y_k`` ``(N, R, K)``: the explained classes' logits with channel ``k`` ablated."""
        assert capture.x is not None and capture.forward is not None and self.target is not None
        x, classes, forward = capture.x, capture.classes, capture.forward
        axis = _channel_axis(self.target)
        step = capture.batch_size
        if self.cut is not None:
            live, source = self._prefix(forward, x)
            tick(capture, 0)
            # the part after the target is often bound by its weights (VGG's classifier): more rows
            # per pass, as long as the ablated copies stay small
            row = source[:1].numel() * source.element_size()
            step = max(step, min(TAIL_ROWS * step, TAIL_BYTES // max(row, 1)))

        def score(start: int, end: int, image: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
            with capture.pinned(image):  # a segmentation target keeps the original image's mask
                if self.cut is not None:
                    rows = image.to(source.device)
                    ablated = _zero_channels(source.index_select(0, rows), channel, axis)
                    chosen = [v.index_select(0, rows) if b else v for v, b in zip(live, self.cut.batched, strict=True)]
                    logits = self._tail(forward, chosen, ablated, x).float()
                else:
                    logits = self._full_passes(forward, x.index_select(0, image.to(x.device)), channel, axis)
            return logits.gather(1, classes.index_select(0, image).to(logits.device))

        return fill_scores(capture, step, score)

    def _full_passes(self, forward: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor,
                     channel: torch.Tensor, axis: int) -> torch.Tensor:  # fmt: skip
        """The whole model on ``batch``, channel ``channel[j]`` of row ``j`` zeroed at the target."""
        assert self.module is not None and self.target is not None
        layer = resolve_module(self.module, self.target.name)
        if self.target.point == "input":

            def pre_hook(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                return (_zero_channels(args[0].clone(), channel, axis), *args[1:])

            handle = layer.register_forward_pre_hook(pre_hook)
        else:

            def hook(_: nn.Module, __: Any, output: torch.Tensor) -> torch.Tensor:
                return _zero_channels(output.clone(), channel, axis)

            handle = layer.register_forward_hook(hook)
        try:
            return forward(batch).float()
        finally:
            handle.remove()
