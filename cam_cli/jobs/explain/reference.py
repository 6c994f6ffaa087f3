"""``--target similar:REF``, ``dissimilar:REF`` and ``--target-embedding FILE.npy``: the
reference an embedding model's images are compared with.

The reference is embedded once, before the run, by the same model with the same
preprocessing as the run's images (resized whole to the input size with the model's
interpolation, then normalised); a folder gives the mean of its images' embeddings.
What it was (kind, path, a hash of its bytes) goes into every manifest line, and a
resume with another reference is refused like a resume with another model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cam_cli.errors import CamxError, InputError, ModelError
from cam_cli.images import DEFAULT_MAX_PIXELS, discover
from cam_cli.jobs.data import ImageDataset, collate
from cam_cli.models import Classifier
from cam_cli.models.embedding import Kind, SimilarityHead, as_embeddings
from cam_cli.targets import TargetSpec

KINDS: tuple[Kind, ...] = ("similar", "dissimilar")


@dataclass(frozen=True)
class Reference:
    """What the images are compared with: ``embedding`` ``(D,)`` and where it came from."""

    kind: Kind
    path: str
    sha256: str
    images: int | None
    embedding: torch.Tensor

    @property
    def target(self) -> str:
        return f"{self.kind}:{self.path}"

    def record(self) -> dict[str, Any]:
        """The manifest's ``reference`` field."""
        found = {"kind": self.kind, "path": self.path, "sha256": self.sha256}
        return found if self.images is None else {**found, "images": self.images}


def similarity_target(target: str, embedding: Path | None) -> tuple[Kind, Path | None] | None:
    """``(kind, REF)`` when ``--target``/``--target-embedding`` ask for a similarity (REF None:
    the ``.npy`` file), else None (a class target)."""
    head, sep, rest = target.strip().partition(":")
    kind = head.lower()
    if embedding is not None:
        if kind not in (*KINDS, "top1") or sep:
            raise CamxError(f"--target {target} with --target-embedding: give --target similar or dissimilar")
        return ("dissimilar" if kind == "dissimilar" else "similar"), None
    if kind in KINDS and not sep:
        raise CamxError(
            f"--target {kind} needs a reference: {kind}:IMAGE, {kind}:FOLDER or --target-embedding FILE.npy"
        )
    if kind not in KINDS:
        return None
    if not rest:
        raise CamxError(f"--target {target}: name an image or a folder of images after '{kind}:'")
    return kind, Path(rest)  # type: ignore[return-value]


def load_reference(
    kind: Kind,
    source: Path | None,
    npy: Path | None,
    classifier: Classifier,
    device: torch.device,
    batch: int,
    expected: str | None = None,
) -> Reference:
    """The reference embedding of an image, a folder of images (their mean), or a ``.npy``
    file; ``InputError`` before anything is embedded when its sha256 is not ``expected``."""
    if npy is not None:
        try:
            data = npy.read_bytes()
            array = np.load(npy, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read --target-embedding {npy}: {exc}") from None
        if array.ndim != 1 and not (array.ndim == 2 and array.shape[0] == 1) or not np.isfinite(array).all():
            raise InputError(f"--target-embedding {npy}: expected one finite vector, got shape {array.shape}")
        digest = hashlib.sha256(data).hexdigest()
        check_digest(npy, digest, expected)
        return Reference(kind, str(npy), digest, None, torch.from_numpy(array.astype(np.float32)).flatten())
    assert source is not None
    if not source.exists():
        raise InputError(f"--target {kind}:{source}: no such file or folder")
    found = discover([source])
    if not found:
        raise InputError(f"--target {kind}:{source}: no images there")
    hashed = hashlib.sha256()
    for image in found:
        hashed.update(image.key.encode("utf-8") + b"\0" + image.path.read_bytes())
    check_digest(source, hashed.hexdigest(), expected)
    embedding = embed_images(found, classifier, device, batch)
    return Reference(kind, str(source), hashed.hexdigest(), len(found), embedding)


def check_digest(path: Path, digest: str, expected: str | None) -> None:
    """``InputError`` when the reference at ``path`` is not the one recorded (sha256 ``expected``)."""
    if expected is not None and digest != expected:
        raise InputError(
            f"the reference {path} changed since the run (sha256 {digest[:12]}..., the manifest records "
            f"{expected[:12]}...): put the original back, or explain again with --overwrite"
        )


def embed_images(found: list[Any], classifier: Classifier, device: torch.device, batch: int) -> torch.Tensor:
    """The mean embedding ``(D,)`` of ``found``, preprocessed as the run preprocesses its images."""
    dataset = ImageDataset(found, classifier.input_size, DEFAULT_MAX_PIXELS, classifier.interpolation)
    module = classifier.module.to(device)
    mean = torch.tensor(classifier.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(classifier.std, device=device).view(1, 3, 1, 1) * 255
    total: torch.Tensor | None = None
    with torch.inference_mode():
        for start in range(0, len(dataset), batch):
            items = collate([dataset[i] for i in range(start, min(start + batch, len(dataset)))])
            if items.errors:
                index, reason = items.errors[0]
                raise InputError(f"reference image {found[index].path}: {reason}")
            assert items.images is not None
            x = (items.images.to(device).float() - mean) / std
            embeddings = as_embeddings(module(x), classifier.output_key).float().sum(dim=0)
            total = embeddings if total is None else total + embeddings
    assert total is not None
    return (total / len(found)).cpu()


def with_reference(classifier: Classifier, reference: Reference) -> tuple[Classifier, TargetSpec]:
    """``classifier`` (an embedding model) turned into its similarity to ``reference``: one
    output, named after the target, explained as ``top1``."""
    head = SimilarityHead(classifier.module, reference.embedding, reference.kind, classifier.output_key)
    head.eval()
    # a fresh readout: the head gives the similarity itself, whatever the model's output was
    wrapped = replace(classifier, module=head, categories=[reference.target], output_key=None, readout=None)
    return wrapped, TargetSpec(reference.target, top=1)


def reference_for(config: Any, classifier: Classifier, device: torch.device) -> Reference | None:
    """The run's reference (None: a class target), embedded on ``device``."""
    asked = similarity_target(config.target, config.target_embedding)
    if asked is None:
        return None
    if classifier.prompts is not None:
        raise ModelError("a CLIP model is explained by its prompts (--target top1/NAME), not by similarity")
    kind, source = asked
    return load_reference(kind, source, config.target_embedding, classifier, device, config.batch_size)
