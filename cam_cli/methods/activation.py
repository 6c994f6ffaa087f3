"""The activation family: maps from the target activation ``A`` ``(N, K, h, w)``
alone, no backward pass. Not class-specific: one map per image, recorded
against the top-1 class."""

from __future__ import annotations

from typing import Any

import torch

from cam_cli.errors import CamxError, ModelError
from cam_cli.methods.base import (
    Capture,
    MapLabels,
    Method,
    MethodOptions,
    Setup,
    TargetLayer,
    first_component,
    resolve_module,
    sign_corrected,
)

SPATIAL = (2, 3)


def decomposition(method: str, name: str) -> Any:
    """scikit-learn's ``sklearn.decomposition.NAME`` (the ``sklearn`` extra), or a one-line
    ``CamxError`` naming ``method`` and the extra to install."""
    try:
        import sklearn.decomposition
    except ImportError:
        raise CamxError(f"{method} needs scikit-learn: pip install 'camx[sklearn]'") from None
    return getattr(sklearn.decomposition, name)


class EigenCAM(Method):
    """Muhammad & Yeasin 2020: the first principal component of ``A`` (sign-corrected), then ReLU."""

    name = "eigencam"

    def maps(self, capture: Capture) -> torch.Tensor:
        return torch.relu(first_component(capture.features))[:, None]


class KPCACAM(Method):
    """Karmani et al. 2024: Eigen-CAM with kernel PCA. Per image, ``A`` as ``(h*w, K)``
    with each channel centred, projected on its first kernel principal component
    (scikit-learn's ``KernelPCA``, ``--kpca-kernel``/``--kpca-gamma``), sign-corrected
    as ``eigencam``; then ReLU. Runs on the CPU in float32, one image at a time."""

    name = "kpcacam"

    def __init__(self, options: MethodOptions | None = None) -> None:
        super().__init__(options)
        self._pca = decomposition(self.name, "KernelPCA")

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "kpca_kernel": self.options.kpca_kernel, "kpca_gamma": self.options.kpca_gamma}

    def maps(self, capture: Capture) -> torch.Tensor:
        a = torch.nan_to_num(capture.features.detach().float(), nan=0.0).cpu()
        n, k, h, w = a.shape
        rows = a.reshape(n, k, h * w).transpose(1, 2)
        centred = (rows - rows.mean(dim=1, keepdim=True)).numpy()
        projections = []
        for x in centred:
            pca = self._pca(n_components=1, kernel=self.options.kpca_kernel, gamma=self.options.kpca_gamma)
            projections.append(torch.from_numpy(pca.fit_transform(x)[:, 0].copy()))
        projection = sign_corrected(torch.stack(projections).float())
        return torch.relu(projection).reshape(n, 1, h, w).to(capture.features.device)


class FEM(Method):
    """Fuad et al. 2020: ``w_k`` = the share of positions where ``A_k`` exceeds its
    mean plus two (population) standard deviations."""

    name = "fem"

    def weights(self, capture: Capture, r: int) -> torch.Tensor:
        a = capture.features
        threshold = a.mean(dim=SPATIAL, keepdim=True) + 2 * a.std(dim=SPATIAL, correction=0, keepdim=True)
        return (a > threshold).float().mean(dim=SPATIAL)


class RandomCAM(Method):
    """A control: channel weights uniform in ``[-1, 1]``, drawn once per run from
    ``--seed`` (the same for every image, so a batch does not change them)."""

    name = "random"
    _drawn: dict[int, torch.Tensor]

    def __init__(self, options: MethodOptions | None = None) -> None:
        super().__init__(options)
        self._drawn = {}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "seed": self.options.seed}

    def weights(self, capture: Capture, r: int) -> torch.Tensor:
        n, k = capture.features.shape[:2]
        drawn = self._drawn.get(k)
        if drawn is None:
            generator = torch.Generator().manual_seed(self.options.seed)
            drawn = self._drawn[k] = torch.rand(k, generator=generator, dtype=torch.float64).mul_(2).sub_(1).float()
        return drawn.to(capture.features.device).expand(n, k)


#: how many of a concept's best classes its manifest entry lists
CONCEPT_CLASSES = 3


class DFF(Method):
    """Collins et al. 2018, Deep Feature Factorization: per image, the non-negative
    activations ``A`` as ``(K, h*w)`` (each channel shifted by its minimum) factorised
    by NMF into ``W`` ``(K, C)`` and ``H`` ``(C, h*w)`` (scikit-learn's ``NMF``,
    ``init="random"``, ``random_state=0``, as pytorch-grad-cam), ``C`` = ``--concepts``.
    Each row of ``H`` is a concept's map; each concept's vector ``W[:, c]`` plus the
    shift is labelled by the network after the layer, fed a map holding that vector at
    every position (for a pooling head: the head applied to the vector). The maps come
    ordered by their top class's probability, highest first."""

    name = "dff"
    after_pass = True  # the concepts' labels take a pass of the layers after the target
    labels_maps = True

    def __init__(self, options: MethodOptions | None = None) -> None:
        super().__init__(options)
        self._nmf = decomposition(self.name, "NMF")
        self._target: TargetLayer | None = None
        self._module: torch.nn.Module | None = None

    def map_count(self, targets: int) -> int:
        return self.options.concepts

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "concepts": self.options.concepts}

    def prepare(self, setup: Setup) -> None:
        if setup.target is None or len(setup.targets) > 1:
            raise ModelError("dff factorises one layer; give one --layer for it")
        if setup.target.layout == "tokens":
            raise ModelError("dff labels its concepts through the layers after a convolutional map; "
                             f"layer {setup.target.label} holds tokens: choose a convolutional --layer")  # fmt: skip
        if self.options.concepts < 1:
            raise CamxError("--concepts: give 1 or more")
        self._target = setup.target
        self._module = resolve_module(setup.module, setup.target.name)
        self.passes_per_image = self.options.concepts

    def factorise(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` ``(N, K, h, w)`` -> concept vectors ``(N, C, K)`` (with the shift added
        back) and maps ``(N, C, h, w)``, one NMF per image on the CPU in float32."""
        a = torch.nan_to_num(features.detach().float(), nan=0.0).cpu()
        n, k, h, w = a.shape
        vectors, maps = [], []
        for x in a.reshape(n, k, h * w).numpy():
            offset = x.min(axis=1)
            nmf = self._nmf(n_components=self.options.concepts, init="random", random_state=0)
            concepts = nmf.fit_transform(x - offset[:, None])  # (K, C)
            vectors.append(torch.from_numpy((concepts + offset[:, None]).T.copy()))
            maps.append(torch.from_numpy(nmf.components_.copy()).reshape(-1, h, w))
        return torch.stack(vectors).float(), torch.stack(maps).float()

    def label(self, capture: Capture, vectors: torch.Tensor) -> torch.Tensor:
        """The logits ``(N, C, classes)`` of each concept vector ``(N, C, K)``: the model run
        on the batch with the target layer's output replaced by a map holding the vector at
        every position (passes of ``capture.batch_size`` rows, counted per concept)."""
        assert self._target is not None and self._module is not None and capture.forward is not None
        assert capture.x is not None
        target, x = self._target, capture.x
        n, c, _ = vectors.shape
        h, w = capture.features.shape[-2:]
        rows = vectors.reshape(n * c, -1).to(x.device)
        images = x.repeat_interleave(c, dim=0)
        out = []
        for start in range(0, n * c, capture.batch_size):
            chunk = rows[start : start + capture.batch_size]
            filled = chunk[:, :, None, None].expand(-1, -1, h, w)
            if target.layout == "nhwc":
                filled = filled.permute(0, 2, 3, 1)

            def swap(tensor: torch.Tensor, filled: torch.Tensor = filled) -> torch.Tensor:
                return filled.to(tensor.dtype).clone()

            if target.point == "input":
                handle = self._module.register_forward_pre_hook(lambda _m, args: (swap(args[0]), *args[1:]))
            else:
                handle = self._module.register_forward_hook(lambda _m, _i, output: swap(output))
            try:
                out.append(capture.forward(images[start : start + len(chunk)]).float())
            finally:
                handle.remove()
            if capture.on_passes is not None:
                capture.on_passes(len(chunk))
        return torch.cat(out).reshape(n, c, -1)

    def maps(self, capture: Capture) -> torch.Tensor:
        vectors, maps = self.factorise(capture.features)
        probabilities = self.label(capture, vectors).softmax(dim=-1).cpu()  # (N, C, classes)
        top = probabilities.topk(min(CONCEPT_CLASSES, probabilities.shape[-1]), dim=-1)
        order = top.values[:, :, 0].argsort(dim=1, descending=True, stable=True)  # (N, C)
        details = [
            [
                {
                    "concept": int(j),
                    "concept_classes": top.indices[i, j].tolist(),
                    "concept_scores": [round(float(s), 6) for s in top.values[i, j]],
                }
                for j in order[i]
            ]
            for i in range(len(order))
        ]
        classes = top.indices[:, :, 0].gather(1, order).to(capture.features.device)
        scores = top.values[:, :, 0].gather(1, order).to(capture.features.device)
        self.concept_labels = MapLabels(classes, scores, details)
        index = order[:, :, None, None].expand(-1, -1, *maps.shape[-2:])
        return maps.gather(1, index).to(capture.features.device)
