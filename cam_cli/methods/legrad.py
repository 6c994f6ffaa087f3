"""LeGrad (Bousselham et al., LeGrad: An Explainability Method for Vision Transformers via
Feature Formation Sensitivity, 2024), as torchcam 0.5.0's ``LeGrad`` computes it.

No target layer: it reads every transformer block ``l`` of the model. With ``Z_l`` the
block's output tokens ``(N, T, E)`` and ``A_l`` its attention probabilities (after the
softmax) ``(N, heads, T, T)``, the block's score is the model's own head applied to the
final norm of the mean token, ``s_l = head(norm(mean_t Z_l))[c]``, and

    E_l = mean_{heads, queries} ReLU(d s_l / d A_l)       (keys of the patch tokens only)
    M   = mean_l E_l                                      on the patch grid

(no attention in the product: the gradient alone). One forward pass and, per block and
class, a backward pass that reaches only that block: each block's attention is made a
leaf of the graph, as a target layer's activation is (``ActivationCapture``).

Which models: torchvision's ``VisionTransformer`` (torchcam's only one), timm's vision
transformers whose blocks hold timm's ``Attention`` (run without the fused kernel for the
pass, its softmax read where it enters ``attn_drop``), and Hugging Face's ViT; the
attention of the first two is computed as their own unfused code does, Hugging Face's
as its eager code does. Others are refused in one line.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cam_cli.errors import ModelError
from cam_cli.methods.base import ClassChooser, Method, Setup
from cam_cli.methods.perturbation import standing_in

Keep = Callable[[int, torch.Tensor], None]


@dataclass
class Transformer:
    """What LeGrad needs of a vision transformer: its blocks, how to read each one's
    attention (a context that makes block ``i``'s attention a leaf and gives it to
    ``keep``), the head from tokens to logits, and the tokens before the patches."""

    kind: str
    blocks: list[nn.Module]
    attend: Callable[[Keep], contextlib.AbstractContextManager[None]]
    project: Callable[[torch.Tensor], torch.Tensor]
    prefix: int


def _leaf(attention: torch.Tensor) -> torch.Tensor:
    return attention.detach().requires_grad_(True)


def _torchvision(model: nn.Module) -> Transformer | None:
    encoder, heads = getattr(model, "encoder", None), getattr(model, "heads", None)
    layers, norm = getattr(encoder, "layers", None), getattr(encoder, "ln", None)
    if not isinstance(layers, nn.Module) or not isinstance(norm, nn.Module) or not isinstance(heads, nn.Module):
        return None
    blocks = list(layers.children())
    attentions = [a for b in blocks if isinstance(a := getattr(b, "self_attention", None), nn.MultiheadAttention)]
    if not blocks or len(attentions) != len(blocks):
        return None
    if any(a.bias_k is not None or a.add_zero_attn or not a.batch_first for a in attentions):
        raise ModelError("legrad: this torchvision ViT's attention adds key tokens or is not batch-first")

    def attention_of(module: nn.MultiheadAttention, i: int, keep: Keep) -> Callable[..., Any]:
        def forward(query: torch.Tensor, *_: Any, **__: Any) -> tuple[torch.Tensor, None]:
            n, t, e = query.shape
            heads_, dim = module.num_heads, e // module.num_heads
            q, k, v = F.linear(query, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
            q, k, v = (z.reshape(n, t, heads_, dim).transpose(1, 2) for z in (q, k, v))
            attention = _leaf(torch.softmax((q * math.sqrt(1.0 / dim)) @ k.transpose(-2, -1), dim=-1))
            keep(i, attention)
            out = (attention @ v).transpose(1, 2).reshape(n, t, e)
            return module.out_proj(out), None

        return forward

    @contextlib.contextmanager
    def attend(keep: Keep) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for i, module in enumerate(attentions):
                stack.enter_context(standing_in(module, attention_of(module, i, keep)))
            yield

    return Transformer("torchvision", blocks, attend, lambda z: heads(norm(z.mean(dim=1))), 1)


def _timm(model: nn.Module) -> Transformer | None:
    blocks_module = getattr(model, "blocks", None)
    if not type(model).__module__.startswith("timm.") or not isinstance(blocks_module, nn.Module):
        return None
    blocks = list(blocks_module.children())
    attentions = [getattr(b, "attn", None) for b in blocks]
    if not blocks or not all(hasattr(a, "fused_attn") and isinstance(getattr(a, "attn_drop", None), nn.Module)
                             for a in attentions):  # fmt: skip
        return None
    parts = [getattr(model, name, None) for name in ("norm", "fc_norm", "head_drop", "head")]
    if not all(isinstance(p, nn.Module) for p in parts):
        return None

    @contextlib.contextmanager
    def attend(keep: Keep) -> Iterator[None]:
        saved = [a.fused_attn for a in attentions]  # type: ignore[union-attr]
        handles = []
        try:
            for i, a in enumerate(attentions):
                a.fused_attn = False  # type: ignore[union-attr]

                def hook(_: nn.Module, __: Any, output: torch.Tensor, i: int = i) -> torch.Tensor:
                    leaf = _leaf(output)
                    keep(i, leaf)
                    return leaf

                handles.append(a.attn_drop.register_forward_hook(hook))  # type: ignore[union-attr]
            yield
        finally:
            for handle in handles:
                handle.remove()
            for a, fused in zip(attentions, saved, strict=True):
                a.fused_attn = fused  # type: ignore[union-attr]

    def project(z: torch.Tensor) -> torch.Tensor:
        for p in parts:
            z = p(z)  # type: ignore[misc]
        return z

    prefix = int(getattr(model, "num_prefix_tokens", 1))
    return Transformer("timm", blocks, attend, lambda z: project(z.mean(dim=1)), prefix)


def _hugging_face(model: nn.Module) -> Transformer | None:
    vit, classifier = getattr(model, "vit", None), getattr(model, "classifier", None)
    layers, norm = getattr(vit, "layers", None), getattr(vit, "layernorm", None)
    if layers is None:
        layers = getattr(getattr(vit, "encoder", None), "layer", None)
    if not isinstance(layers, nn.Module) or not isinstance(norm, nn.Module) or not isinstance(classifier, nn.Module):
        return None
    blocks = list(layers.children())
    attentions = [getattr(b, "attention", None) for b in blocks]
    wanted = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
    if not blocks or not all(all(hasattr(a, name) for name in wanted) for a in attentions):
        return None

    def attention_of(module: Any, i: int, keep: Keep) -> Callable[..., Any]:
        def forward(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
            shape = (*hidden.shape[:-1], -1, module.head_dim)
            q, k, v = (p(hidden).view(shape).transpose(1, 2) for p in (module.q_proj, module.k_proj, module.v_proj))
            scores = (q @ k.transpose(2, 3)) * module.scaling
            if attention_mask is not None:
                scores = scores + attention_mask
            attention = _leaf(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
            keep(i, attention)
            out = (attention @ v).transpose(1, 2).reshape(*hidden.shape[:-1], -1)
            return module.o_proj(out), attention

        return forward

    @contextlib.contextmanager
    def attend(keep: Keep) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for i, module in enumerate(attentions):
                stack.enter_context(standing_in(module, attention_of(module, i, keep)))  # type: ignore[arg-type]
            yield

    return Transformer("hf", blocks, attend, lambda z: classifier(norm(z.mean(dim=1))), 1)


def find_transformer(model: nn.Module) -> Transformer | None:
    """The first module of ``model`` (itself included) that LeGrad can read, or None."""
    for module in model.modules():
        for reader in (_torchvision, _timm, _hugging_face):
            found = reader(module)
            if found is not None:
                return found
    return None


def patch_grid(patches: int, height: int, width: int) -> tuple[int, int]:
    """The ``(rows, columns)`` of ``patches`` tokens laid out like an ``height x width`` input."""
    rows = max(1, round(math.sqrt(patches * height / width)))
    if patches % rows:
        raise ModelError(f"legrad: {patches} patch tokens do not form a grid for a {height}x{width} input")
    return rows, patches // rows


class LeGrad(Method):
    """Bousselham et al. 2024: the mean over blocks of the positive gradient of each block's
    score with respect to its attention, averaged over heads and queries (see the module)."""

    name = "legrad"
    needs_gradient = True
    transformer: Transformer | None = None

    def prepare(self, setup: Setup) -> None:
        self.transformer = find_transformer(setup.module)
        if self.transformer is None:
            raise ModelError(
                f"legrad reads the attention of vision transformers (torchvision's VisionTransformer, timm's ViTs, "
                f"Hugging Face's ViT); {type(setup.module).__name__} is none of them"
            )

    def run(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        classes: torch.Tensor | None,
        choose: ClassChooser,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Its own pass: ``(logits (N, C), classes (N, R), maps (N, R, rows, columns))``."""
        spec = self.transformer
        assert spec is not None
        count = len(spec.blocks)
        attentions: list[torch.Tensor | None] = [None] * count
        tokens: list[torch.Tensor | None] = [None] * count

        def keep(i: int, attention: torch.Tensor) -> None:
            attentions[i] = attention

        def keep_tokens(i: int) -> Callable[..., None]:
            def hook(_: nn.Module, __: Any, output: Any) -> None:
                tokens[i] = output[0] if isinstance(output, tuple) else output

            return hook

        handles = [block.register_forward_hook(keep_tokens(i)) for i, block in enumerate(spec.blocks)]
        try:
            with torch.inference_mode(False), torch.enable_grad(), spec.attend(keep):
                out = forward(x.detach())
                logits = out.detach().float()
                chosen = classes if classes is not None else choose(logits)
                maps = self.relevance(spec, attentions, tokens, chosen, x.shape[-2:])
        finally:
            for handle in handles:
                handle.remove()
        return logits, chosen, maps

    @staticmethod
    def relevance(
        spec: Transformer,
        attentions: list[torch.Tensor | None],
        tokens: list[torch.Tensor | None],
        chosen: torch.Tensor,
        size: torch.Size,
    ) -> torch.Tensor:
        """``(N, R, rows, columns)``: per class, the mean over blocks of ``mean ReLU(d s_l / d A_l)``."""
        ranks = chosen.shape[1]
        total: torch.Tensor | None = None
        for i, (attention, block_tokens) in enumerate(zip(attentions, tokens, strict=True)):
            if attention is None or block_tokens is None or attention.dim() != 4:
                raise ModelError(f"legrad: block {i} of the {spec.kind} ViT gave no attention map to read")
            scores = spec.project(block_tokens).float()
            per_rank = []
            for r in range(ranks):
                score = scores.gather(1, chosen[:, r : r + 1].to(scores.device)).sum()
                (grad,) = torch.autograd.grad(score, attention, retain_graph=True)
                per_rank.append(grad.float().clamp(min=0).mean(dim=(1, 2))[:, spec.prefix :])
            layer = torch.stack(per_rank, dim=1)  # (N, R, patches)
            total = layer if total is None else total + layer
        assert total is not None
        mean = total / len(attentions)
        rows, cols = patch_grid(mean.shape[-1], int(size[0]), int(size[1]))
        return mean.reshape(*mean.shape[:2], rows, cols)
