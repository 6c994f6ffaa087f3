"""Embedding models explained by similarity: the scalar of each image is the cosine
similarity of its embedding to a reference embedding (``--target similar:REF``), or
one minus it (``dissimilar:REF``).

These are pytorch-grad-cam's ``SimilarityToConceptTarget`` and
``DifferenceFromConceptTarget``, made part of the model: :class:`SimilarityHead`
turns any module that gives an embedding ``(N, D)`` into a one-output "classifier"
``(N, 1)``, so every method, output and resume rule works unchanged.

The embedding of a Hugging Face encoder (``hf:`` folders of ``ViTModel``, ``Dinov2Model``...)
is its ``pooler_output``: what the model itself offers as one vector per image (ViT's
dense + tanh over the class token, DINOv2's layer-normed class token, a CNN's global average).
Where the model has no pooler, or the folder's weights do not hold it (a ViT checkpoint
saved without its pooler, or a classifier's folder read with ``--num-classes 0``: its
pooler would be random), it is the class token of ``last_hidden_state`` (for a spatial
``(N, C, h, w)`` output, its mean over positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from cam_cli.errors import ModelError
from cam_cli.models.base import extract_logits
from cam_cli.models.readout import Readout

Kind = Literal["similar", "dissimilar"]


def as_embeddings(output: object, key: str | None) -> torch.Tensor:
    """``(N, D)`` embeddings from a model's output (``--output-key`` picks one of several;
    a Hugging Face encoder's ``pooler_output``, else its class token, by default)."""
    if key is None:
        pooled = getattr(output, "pooler_output", None)
        if isinstance(pooled, torch.Tensor):
            return pooled.flatten(1)
        hidden = getattr(output, "last_hidden_state", None)
        if isinstance(hidden, torch.Tensor) and hidden.ndim in (3, 4):
            return hidden[:, 0] if hidden.ndim == 3 else hidden.flatten(2).mean(dim=2)
    tensor = extract_logits(output, key)
    if tensor.ndim < 2:
        raise ModelError(f"the model gives outputs of shape {tuple(tensor.shape)}, not one embedding per image")
    return tensor.flatten(1)


class EmbeddingReadout(Readout):
    """An encoder's output read as its embedding ``(N, D)`` (what ``camx layers`` probes with;
    a run explains it through :class:`SimilarityHead`)."""

    def __call__(self, output: Any) -> torch.Tensor:
        return as_embeddings(output, self.output_key)


def drop_untrained_pooler(module: nn.Module, missing: Sequence[str], name: str) -> list[str]:
    """Remove ``module.pooler`` when the weights loaded did not hold it (``missing``: the
    parameters left at their random start), so that the embedding is the class token;
    the note that says so."""
    if getattr(module, "pooler", None) is None or not any(k.split(".")[0] == "pooler" for k in missing):
        return []
    setattr(module, "pooler", None)  # noqa: B010 (transformers' own "no pooling layer" state)
    return [f"{name}: its weights hold no pooler (it would be random): the embedding is the class token"]


class SimilarityHead(nn.Module):
    """``model`` (images -> embeddings) scored against ``reference`` ``(D,)``: ``(N, 1)``,
    ``cos(e, r)`` for ``similar`` and ``1 - cos(e, r)`` for ``dissimilar``."""

    reference: torch.Tensor

    def __init__(self, model: nn.Module, reference: torch.Tensor, kind: Kind, output_key: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("reference", reference.detach().float().flatten())
        self.kind = kind
        self.output_key = output_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = as_embeddings(self.model(x), self.output_key)
        if embedding.shape[1] != self.reference.numel():
            raise ModelError(
                f"the model's embeddings have {embedding.shape[1]} values, the reference {self.reference.numel()}"
            )
        cosine = F.cosine_similarity(embedding.float(), self.reference[None], dim=1, eps=1e-8)
        scalar = cosine if self.kind == "similar" else 1 - cosine
        return scalar[:, None]
