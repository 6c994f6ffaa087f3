"""Embedding models explained by similarity: the scalar of each image is the cosine
similarity of its embedding to a reference embedding (``--target similar:REF``), or
one minus it (``dissimilar:REF``).

These are pytorch-grad-cam's ``SimilarityToConceptTarget`` and
``DifferenceFromConceptTarget``, made part of the model: :class:`SimilarityHead`
turns any module that gives an embedding ``(N, D)`` into a one-output "classifier"
``(N, 1)``, so every method, output and resume rule works unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from cam_cli.errors import ModelError
from cam_cli.models.base import extract_logits

Kind = Literal["similar", "dissimilar"]


def as_embeddings(output: object, key: str | None) -> torch.Tensor:
    """``(N, D)`` embeddings from a model's output (``--output-key`` picks one of several;
    a Hugging Face encoder's ``pooler_output`` by default)."""
    if key is None and hasattr(output, "pooler_output") and isinstance(output.pooler_output, torch.Tensor):
        return output.pooler_output.flatten(1)
    tensor = extract_logits(output, key)
    if tensor.ndim < 2:
        raise ModelError(f"the model gives outputs of shape {tuple(tensor.shape)}, not one embedding per image")
    return tensor.flatten(1)


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
