"""Where maps are taken from (:class:`TargetLayer`), the hook that captures that
tensor in a forward pass (:class:`ActivationCapture`), and reading it as a
``(N, K, h, w)`` feature map whatever the model's layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from cam_cli.errors import ModelError

Layout = Literal["nchw", "nhwc", "tokens"]


@dataclass(frozen=True)
class TargetLayer:
    """Where the maps are taken from.

    ``point`` is ``"output"`` (the module's output) or ``"input"`` (the tensor
    that enters it, used for the input of a global pooling module).  ``layout``
    says how to read the tensor as a feature map: ``nchw``, channels-last
    ``nhwc``, or ``tokens`` ``(N, T, D)`` whose last ``grid[0] * grid[1]``
    tokens form the patch grid (class tokens in front are dropped).
    """

    name: str
    point: Literal["output", "input"] = "output"
    layout: Layout = "nchw"
    grid: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        """How the layer is written on the command line and in the manifest."""
        return self.name if self.point == "output" else f"{self.name}:input"


def to_feature_map(tensor: torch.Tensor, target: TargetLayer) -> torch.Tensor:
    """Read a captured activation (or its gradient) as ``(N, K, h, w)``."""
    if target.layout == "nchw":
        return tensor
    if target.layout == "nhwc":
        return tensor.permute(0, 3, 1, 2)
    assert target.grid is not None
    gh, gw = target.grid
    n, t, d = tensor.shape
    patches = tensor[:, t - gh * gw :, :]
    return patches.reshape(n, gh, gw, d).permute(0, 3, 1, 2)


class ActivationCapture:
    """Context manager that hooks ``target`` and keeps what passes through it.

    With ``requires_grad``, the activation is swapped for a fresh leaf that
    requires grad (and a copy of it goes on through the model), so that with
    frozen parameters autograd records only the part of the network *after*
    the target layer, and ``torch.autograd.grad(score, capture.activation)``
    is the whole backward pass.  The hook is removed on exit, exceptions
    included.
    """

    def __init__(self, model: nn.Module, target: TargetLayer, requires_grad: bool, chain: bool = False) -> None:
        self.model = model
        self.target = target
        self.requires_grad = requires_grad
        #: several layers hooked in one pass: a tensor already in the graph (a layer after
        #: another hooked one) stays in it, so that gradients reach the earlier layers too
        self.chain = chain
        self.activation: torch.Tensor | None = None
        self._handle: Any = None

    def _swap(self, tensor: Any) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise ModelError(
                f"layer {self.target.label} gives a {type(tensor).__name__}, not a tensor; "
                "choose another --layer (see `camx layers MODEL`)"
            )
        if self.requires_grad and self.chain and tensor.requires_grad:
            self.activation = tensor
            return tensor.clone()
        if self.requires_grad:
            leaf = tensor.detach().requires_grad_(True)
            self.activation = leaf
            return leaf.clone()
        self.activation = tensor.detach()
        return tensor.clone()

    def __enter__(self) -> ActivationCapture:
        module = resolve_module(self.model, self.target.name)
        if self.target.point == "input":

            def pre_hook(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                return (self._swap(args[0]), *args[1:])

            self._handle = module.register_forward_pre_hook(pre_hook)
        else:

            def hook(_: nn.Module, __: Any, output: Any) -> torch.Tensor:
                return self._swap(output)

            self._handle = module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def feature_map(self) -> torch.Tensor:
        if self.activation is None:
            raise ModelError(f"layer {self.target.label} was not reached by the forward pass")
        return to_feature_map(self.activation, self.target)


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that points to ``camx layers``."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"unknown layer {name!r}; `camx layers MODEL` lists the layers") from None
