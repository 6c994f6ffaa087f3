"""The activation family: maps from the target activation ``A`` ``(N, K, h, w)``
alone, no backward pass. Not class-specific: one map per image, recorded
against the top-1 class."""

from __future__ import annotations

from typing import Any

import torch

from cam_cli.errors import CamxError
from cam_cli.methods.base import Capture, Method, MethodOptions, first_component, sign_corrected

SPATIAL = (2, 3)


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
        try:
            from sklearn.decomposition import KernelPCA
        except ImportError:
            raise CamxError("kpcacam needs scikit-learn: pip install 'camx[sklearn]'") from None
        self._pca = KernelPCA

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
