"""Every CAM method camx offers, by the name typed after ``--method``.

This module is torch-free: ``camx methods`` and ``camx --help`` read it without
importing any implementation. Each entry names the class that implements it
(``module:Class``), imported on first use by :func:`load`, the way timm's
registry and llm's plugins find their implementations.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from cam_cli.errors import suggest

Family = Literal["gradient", "activation", "perturbation"]


@dataclass(frozen=True)
class MethodInfo:
    """What a method is and what it costs, before anything is imported.

    ``forwards`` and ``backwards`` are the passes one image needs when the
    method runs alone; methods of one run share the forward pass, and the
    gradient methods that only read the activation and its gradient share one
    backward pass (``shares_backward``).
    """

    name: str
    family: Family
    implementation: str
    class_specific: bool
    paper: str
    formula: str
    forwards: int = 1
    backwards: int = 0
    uses_layer: bool = True
    shares_backward: bool = False
    eigen_smooth: bool = True
    aug_smooth: bool = True
    #: the forward passes per image where they depend on the model (``K`` = the target
    #: layer's channels), e.g. ``"1+K"``; ``forwards`` is then the shared pass alone
    forwards_note: str | None = None
    #: needs nothing but the gradient of a class score at the target layer: the probe's
    #: backward pass reaching the layer shows that it can run (no dry run at start-up)
    plain_gradient: bool = False
    #: writes the 3-channel image behind each map beside it (``KEY.METHOD.grad.npy``), and
    #: shows that image, not a jet overlay (guided backpropagation)
    gradient_file: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "forwards": self.forwards,
            "forwards_note": self.forwards_note,
            "backwards": self.backwards,
            "class_specific": self.class_specific,
            "uses_layer": self.uses_layer,
            "eigen_smooth": self.eigen_smooth,
            "aug_smooth": self.aug_smooth,
            "formula": self.formula,
            "paper": self.paper,
        }


_GRAD = "cam_cli.methods.gradient"
_ACT = "cam_cli.methods.activation"
_PERT = "cam_cli.methods.perturbation"
_SMOOTH = "cam_cli.methods.smooth"
_GUIDED = "cam_cli.methods.guided"

_ENTRIES = (
    MethodInfo(
        "cam", "activation", "cam_cli.methods.cam:CAM", True,
        "Zhou et al., Learning Deep Features for Discriminative Localization, CVPR 2016",
        "sum_k W[c,k] A_k (no ReLU; needs a GAP + linear head)",
    ),
    MethodInfo(
        "gradcam", "gradient", f"{_GRAD}:GradCAM", True,
        "Selvaraju et al., Grad-CAM, ICCV 2017",
        "w_k = mean_ij g; ReLU(sum_k w_k A_k)", backwards=1, shares_backward=True, plain_gradient=True,
    ),
    MethodInfo(
        "gradcam++", "gradient", f"{_GRAD}:GradCAMPlusPlus", True,
        "Chattopadhyay et al., Grad-CAM++, WACV 2018",
        "a = g^2 / (2g^2 + sum_ij(A) g^3 + 1e-6); w_k = sum_ij ReLU(g) a; ReLU(sum_k w_k A_k)",
        backwards=1, shares_backward=True, plain_gradient=True,
    ),
    MethodInfo(
        "smoothgradcam++", "gradient", f"{_SMOOTH}:SmoothGradCAMPlusPlus", True,
        "Omeiza et al., Smooth Grad-CAM++, 2019 (arXiv:1908.01224)",
        "Grad-CAM++ with g, g^2, g^3 the means over N copies x + d, d ~ N(0, std^2) (--noise-samples 4, "
        "--noise-std 0.3, seeded by --seed), A the plain input's; 1 + N forward and N backward passes per image",
        backwards=4, forwards_note="1+N",
    ),
    MethodInfo(
        "xgradcam", "gradient", f"{_GRAD}:XGradCAM", True,
        "Fu et al., Axiom-based Grad-CAM, BMVC 2020",
        "w_k = sum_ij g A / (sum_ij A + 1e-7); ReLU(sum_k w_k A_k)", backwards=1, shares_backward=True,
        plain_gradient=True,
    ),
    MethodInfo(
        "layercam", "gradient", f"{_GRAD}:LayerCAM", True,
        "Jiang et al., LayerCAM, IEEE TIP 2021",
        "ReLU(sum_k ReLU(g_k) * A_k)", backwards=1, shares_backward=True, plain_gradient=True,
    ),
    MethodInfo(
        "hirescam", "gradient", f"{_GRAD}:HiResCAM", True,
        "Draelos & Carin, HiResCAM, 2020 (arXiv:2011.08891)",
        "ReLU(sum_k g_k * A_k)", backwards=1, shares_backward=True, plain_gradient=True,
    ),
    MethodInfo(
        "gradcam-elementwise", "gradient", f"{_GRAD}:GradCAMElementWise", True,
        "pytorch-grad-cam's element-wise Grad-CAM (Gildenblat et al.)",
        "ReLU(sum_k ReLU(g_k * A_k))", backwards=1, shares_backward=True, plain_gradient=True,
    ),
    MethodInfo(
        "eigengradcam", "gradient", f"{_GRAD}:EigenGradCAM", True,
        "Muhammad & Yeasin, Eigen-CAM, IJCNN 2020 (on g * A)",
        "ReLU(first principal component of g * A, sign-corrected)", backwards=1, shares_backward=True,
        eigen_smooth=False, plain_gradient=True,
    ),
    MethodInfo(
        "segeigencam", "gradient", f"{_GRAD}:SegEigenCAM", True,
        "Chung & Ying, Seg-Eigen-CAM, Applied Sciences 2025",
        "ReLU(first principal component of |g| * A, sign-corrected)", backwards=1, shares_backward=True,
        eigen_smooth=False, plain_gradient=True,
    ),
    MethodInfo(
        "shapleycam", "gradient", f"{_GRAD}:ShapleyCAM", True,
        "Cai et al., ShapleyCAM, 2025 (arXiv:2501.06261)",
        "w_k = mean_ij (g - Hv/2), Hv = (d g / d A) A; ReLU(sum_k w_k A_k)", backwards=2,
    ),
    MethodInfo(
        "finercam", "gradient", f"{_GRAD}:FinerCAM", True,
        "Zhang et al., Finer-CAM, CVPR 2025",
        "Grad-CAM of y_c - gamma * y_r, r the nearest other class by logit", backwards=1, aug_smooth=False,
        plain_gradient=True,
    ),
    MethodInfo(
        "refinecam", "gradient", f"{_GRAD}:RefineCAM", True,
        "Domeniconi et al., How to Evaluate and Refine your CAM, 2026 (arXiv:2605.14641)",
        "prod over the layers l of --layer a,b,c (two or more) of minmax(up(minmax(M_l))), M_l the layer's "
        "Grad-CAM++ map, up bilinear to the input; all layers in one forward and one backward pass",
        backwards=1, shares_backward=True, eigen_smooth=False, aug_smooth=False, plain_gradient=True,
    ),
    MethodInfo(
        "fullgrad", "gradient", "cam_cli.methods.fullgrad:FullGrad", True,
        "Srinivas & Fleuret, Full-Gradient Representation, NeurIPS 2019",
        "|x * dy/dx| + sum over Conv2d/BatchNorm2d biases of |b * dy/db|, each min-max'ed and resized",
        backwards=1, uses_layer=False, eigen_smooth=False,
    ),
    MethodInfo(
        "guided-backprop", "gradient", f"{_GUIDED}:GuidedBackprop", True,
        "Springenberg et al., Striving for Simplicity: The All Convolutional Net, ICLR 2015 (workshop)",
        "G = dy/dx with every ReLU's backward G_in * 1[z > 0] * 1[G_in > 0]; map max_c |G_c| "
        "(the 3-channel G in KEY.METHOD.grad.npy)",
        backwards=1, uses_layer=False, eigen_smooth=False, aug_smooth=False, gradient_file=True,
    ),
    MethodInfo(
        "guided-gradcam", "gradient", f"{_GUIDED}:GuidedGradCAM", True,
        "Selvaraju et al., Grad-CAM, ICCV 2017 (Guided Grad-CAM)",
        "G * up(minmax(Grad-CAM)), G the guided-backprop gradient; map max_c |G_c * up(...)| "
        "(the 3-channel product in KEY.METHOD.grad.npy); a forward of its own",
        backwards=2, eigen_smooth=False, aug_smooth=False, gradient_file=True,
    ),
    MethodInfo(
        "scorecam", "perturbation", f"{_PERT}:ScoreCAM", True,
        "Wang et al., Score-CAM, CVPR Workshops 2020",
        "M_k = minmax(upsample(A_k)) to the input (bilinear, align_corners=True); s_k = y_c(x * M_k) "
        "(1 + K forward passes per image, K = the layer's channels); w = softmax_k(s); ReLU(sum_k w_k A_k)",
        aug_smooth=True, forwards_note="1+K",
    ),
    MethodInfo(
        "sscam", "perturbation", f"{_SMOOTH}:SSCAM", True,
        "Wang et al., SS-CAM: Smoothed Score-CAM for Sharper Visual Feature Localization, 2020 (arXiv:2006.14255)",
        "Score-CAM with s_k = mean over N draws of y_c(x * (M_k + d)), d ~ N(0, std^2) at the input's resolution "
        "(--noise-samples 35, --noise-std 2, seeded by --seed; 1 + N*K forward passes per image)",
        forwards_note="1+NK",
    ),
    MethodInfo(
        "iscam", "perturbation", f"{_SMOOTH}:ISCAM", True,
        "Naidu et al., IS-CAM: Integrated Score-CAM for axiomatic-based explanations, 2020 (arXiv:2010.03023)",
        "Score-CAM (torchcam's masks M_k) with s_k = mean over i = 1..N of y_c(x * c_i M_k), c_i = sum_{j<=i} j/N "
        "(--noise-samples 10 steps; 1 + N*K forward passes per image)",
        forwards_note="1+NK",
    ),
    MethodInfo(
        "sess", "perturbation", "cam_cli.methods.sess:SESS", True,
        "Tursun et al., SESS: Saliency Enhancing with Scaling and Sliding, ECCV 2022",
        "the input resized to --sess-scales (12) scales w + round(2w/7) i, w x w windows slid with stride w; "
        "each patch's base map (--sess-base, gradcam) upsampled and min-max'ed, times its class probability "
        "over the best patch's, pasted back; per pixel the mean over the patches reaching it, Gaussian blur "
        "11x11 sigma 5 (1 + P forward and P backward passes per image, P = 122 patches at 224 pixels)",
        backwards=122, aug_smooth=False, forwards_note="1+P",
    ),
    MethodInfo(
        "ablationcam", "perturbation", "cam_cli.methods.ablation:AblationCAM", True,
        "Desai & Ramaswamy, Ablation-CAM, WACV 2020",
        "y_k = y_c with channel k of A set to 0; w_k = (y_c - y_k) / y_c; ReLU(sum_k w_k A_k). "
        "Closed form (no extra pass) where GAP + one linear layer follow the layer; else K passes of the "
        "layers after it (and one of those before), or K whole passes where the network cannot be cut there",
        forwards_note="1+K^",
    ),
    MethodInfo(
        "legrad", "gradient", "cam_cli.methods.legrad:LeGrad", True,
        "Bousselham et al., LeGrad: An Explainability Method for Vision Transformers via Feature Formation "
        "Sensitivity, 2024 (arXiv:2404.03214)",
        "for every block l: s_l = the head on the final norm of the mean of block l's tokens; "
        "mean over heads and queries of ReLU(d s_l / d attn_l), prefix keys dropped, on the patch grid; "
        "then the mean over the blocks (vision transformers: torchvision, timm, Hugging Face)",
        backwards=1, uses_layer=False, eigen_smooth=False, aug_smooth=False,
    ),
    MethodInfo(
        "eigencam", "activation", f"{_ACT}:EigenCAM", False,
        "Muhammad & Yeasin, Eigen-CAM, IJCNN 2020",
        "ReLU(first principal component of A, sign-corrected)", eigen_smooth=False,
    ),
    MethodInfo(
        "kpcacam", "activation", f"{_ACT}:KPCACAM", False,
        "Karmani et al., KPCA-CAM: Visual Explainability of Deep Computer Vision Models using Kernel PCA, 2024",
        "ReLU(first kernel principal component of A (sigmoid kernel by default), sign-corrected)",
        eigen_smooth=False,
    ),
    MethodInfo(
        "dff", "activation", f"{_ACT}:DFF", False,
        "Collins et al., Deep Feature Factorization for Concept Discovery, ECCV 2018",
        "per image, NMF of the non-negative A (K, h*w) into C = --concepts (5) concepts (scikit-learn, seeded); "
        "one map per concept (its row of H), labelled by the layers after A fed the concept's vector "
        "(1 + C forward passes per image)",
        eigen_smooth=False, aug_smooth=False, forwards_note="1+C",
    ),
    MethodInfo(
        "fem", "activation", f"{_ACT}:FEM", False,
        "Fuad et al., Features Understanding in 3D CNNs (FEM), IPTA 2020",
        "w_k = share of positions with A_k > mean_ij A_k + 2 std_ij A_k; ReLU(sum_k w_k A_k)", eigen_smooth=False,
    ),
    MethodInfo(
        "random", "activation", f"{_ACT}:RandomCAM", False,
        "a control: channel weights uniform in [-1, 1] from --seed",
        "w_k ~ U(-1, 1) seeded; ReLU(sum_k w_k A_k)",
    ),
)  # fmt: skip

#: the methods SESS can run on its patches (``--sess-base``): one layer, one pass, no passes of their own
SESS_BASES = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "gradcam-elementwise", "eigengradcam",
              "segeigencam", "eigencam", "kpcacam", "fem", "random")  # fmt: skip

METHODS: dict[str, MethodInfo] = {entry.name: entry for entry in _ENTRIES}


def method_names() -> list[str]:
    """Every method name, in the order ``camx methods`` lists them."""
    return list(METHODS)


def info(name: str) -> MethodInfo:
    """The entry for ``name``; an unknown name raises ``ValueError`` with suggestions."""
    try:
        return METHODS[name]
    except KeyError:
        hint = suggest(name, list(METHODS))
        raise ValueError(f"unknown method {name!r}{hint}; `camx methods` lists them") from None


def load(name: str) -> Any:
    """The class implementing ``name``, imported now."""
    module, _, attribute = info(name).implementation.partition(":")
    return getattr(importlib.import_module(module), attribute)


def parse_methods(values: tuple[str, ...] | list[str] | str) -> list[str]:
    """``--method a,b --method c`` as an ordered list without repeats; ``ValueError`` for unknown names."""
    items = [values] if isinstance(values, str) else list(values)
    names: list[str] = []
    for item in items:
        for part in item.split(","):
            name = part.strip().lower()
            if not name:
                continue
            info(name)
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("--method: give at least one method (`camx methods` lists them)")
    return names
