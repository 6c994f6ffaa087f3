"""CLIP as a zero-shot classifier: ``openclip:ARCH`` (open-clip-torch) and ``hf:PATH``
folders that hold a ``CLIPModel``.

The classes are text prompts. Their embeddings are computed once, when the model
is loaded, and kept as a buffer; the module camx explains is the image tower
followed by

    logit_k = logit_scale · cos(image embedding, text embedding_k) (+ logit_bias)

which is what CLIP's zero-shot evaluation ranks (Radford et al. 2021), so every
method, target and output works as for any classifier.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cam_cli.errors import ModelError, WeightsError, one_line
from cam_cli.models.base import LoadedModel, apply_state_dict, is_keyword, load_state_dict

#: OpenAI's zero-shot prompt, turning a class name into a sentence
DEFAULT_TEMPLATE = "a photo of a {}."
NEEDS_CLASSES = (
    "a CLIP model classifies by text: give the classes with --labels FILE (one name a line) "
    'or --prompt "a photo of a dog" (repeated, one class each)'
)


@dataclass(frozen=True)
class ClassPrompts:
    """The classes of a zero-shot run: their names and the sentence each is embedded as."""

    names: tuple[str, ...]
    prompts: tuple[str, ...]

    @classmethod
    def from_labels(cls, labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> ClassPrompts:
        if "{}" not in template:
            raise ModelError(f"--prompt-template {template!r} has no {{}} for the class name")
        return cls(tuple(labels), tuple(template.replace("{}", label) for label in labels))

    @classmethod
    def from_prompts(cls, prompts: Sequence[str]) -> ClassPrompts:
        cleaned = [p.strip() for p in prompts]
        if not all(cleaned):
            raise ModelError("--prompt: an empty prompt")
        if len(set(cleaned)) < len(cleaned):
            raise ModelError("--prompt: the same prompt twice")
        return cls(tuple(cleaned), tuple(cleaned))


class ZeroShotHead(nn.Module):
    """``visual`` (an image tower giving ``(N, D)`` embeddings) scored against fixed text
    embeddings ``(C, D)``: ``(N, 3, S, S) -> (N, C)`` logits."""

    text: torch.Tensor

    def __init__(
        self, visual: nn.Module, text: torch.Tensor, logit_scale: float, logit_bias: float | None = None
    ) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("text", F.normalize(text.detach().float(), dim=-1))
        self.logit_scale = float(logit_scale)
        self.logit_bias = None if logit_bias is None else float(logit_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.visual(x), dim=-1)
        logits = self.logit_scale * image @ self.text.to(image.dtype).T
        return logits if self.logit_bias is None else logits + self.logit_bias


def import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError:
        raise ModelError("openclip: models need open-clip-torch: pip install 'camx[clip]'") from None
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # its "initialized randomly" line
    return open_clip


def openclip_weights(open_clip: Any, arch: str, choice: str) -> tuple[str | None, Path | None]:
    """``(tag, file)`` for ``--weights``: ``NONE`` -> no file; ``DEFAULT`` or a pretrained tag
    -> the file open_clip would download, found in its local cache only; else a path."""
    tags = list(open_clip.list_pretrained_tags_by_model(arch))
    if is_keyword(choice, "NONE"):
        return None, None
    if is_keyword(choice, "DEFAULT") or choice in tags:
        if not tags:
            raise WeightsError(f"open_clip has no pretrained weights for {arch}; use --weights NONE or a file")
        tag = tags[0] if is_keyword(choice, "DEFAULT") else choice
        return tag, cached_openclip_file(open_clip, arch, tag)
    path = Path(choice).expanduser()
    if not path.is_file():
        hint = f" (its tags: {', '.join(tags)})" if tags else ""
        raise WeightsError(f"--weights {choice}: not a file nor a pretrained tag of {arch}{hint}")
    return None, path


def cached_openclip_file(open_clip: Any, arch: str, tag: str) -> Path:
    """The local copy of ``arch``'s ``tag`` weights (Hugging Face cache, then open_clip's URL
    cache ``~/.cache/clip``); ``WeightsError`` naming the file when it is not there."""
    from cam_cli.models.timm_models import cached_hub_file, hf_cache_dir

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    hub = str(cfg.get("hf_hub", ""))
    repo, filename = os.path.split(hub)
    if hub:
        names = [filename] if filename else ["open_clip_pytorch_model.bin"]
        safe = [n[: -len(Path(n).suffix)] + ".safetensors" for n in names if n.endswith((".bin", ".pth"))]
        if names == ["open_clip_pytorch_model.bin"]:
            safe = ["open_clip_model.safetensors"]
        for name in [*safe, *names]:  # open_clip's own order: the safetensors twin first
            found = cached_hub_file(repo, name)
            if found is not None:
                return found
    url = str(cfg.get("url", ""))
    if url:
        local = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if local.is_file():
            return local
    where = (
        f"{filename or 'open_clip_pytorch_model.bin'} of {repo} in {hf_cache_dir()}"
        if hub
        else f"{os.path.basename(url)} in ~/.cache/clip"
    )
    raise WeightsError(
        f"open_clip's {arch} weights {tag!r} are not in the local cache ({where}); camx does not download: "
        "copy them there from a machine with network, or pass --weights PATH"
    )


def load_openclip(arch: str, weights: str, input_size: int | None, classes: ClassPrompts | None) -> LoadedModel:
    """``openclip:ARCH`` as a :class:`ZeroShotHead` over ``classes``."""
    if not arch:
        raise ModelError("--model openclip: needs an architecture, e.g. openclip:ViT-B-32 (`open_clip.list_models()`)")
    open_clip = import_open_clip()
    if arch not in open_clip.list_models():
        from cam_cli.errors import suggest

        raise ModelError(f"open_clip has no architecture {arch!r}{suggest(arch, open_clip.list_models())}")
    if classes is None:
        raise ModelError(NEEDS_CLASSES)
    tag, path = openclip_weights(open_clip, arch, weights.strip())
    kwargs = {"force_image_size": input_size} if input_size else {}
    try:
        model = open_clip.create_model(arch, pretrained=None, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot build openclip:{arch}: {one_line(exc)}") from None
    if path is not None:
        state = load_state_dict(path)
        if input_size and hasattr(open_clip, "resize_pos_embed"):
            open_clip.resize_pos_embed(state, model)
        apply_state_dict(model, state, str(path))
    model.eval()
    batch_first(model.visual)
    tokenizer = open_clip.get_tokenizer(arch)
    with torch.inference_mode():
        text = model.encode_text(tokenizer(list(classes.prompts)))
    bias = getattr(model, "logit_bias", None)
    head = ZeroShotHead(
        model.visual, text, float(model.logit_scale.detach().exp()), None if bias is None else float(bias.detach())
    )
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    if tag is not None:
        cfg.update({k: v for k, v in open_clip.get_pretrained_cfg(arch, tag).items() if k in ("mean", "std")})
    size = model.visual.image_size
    label = "NONE" if path is None else (tag or str(path))
    return LoadedModel(
        head,
        label,
        int(size[0] if isinstance(size, (tuple, list)) else size),
        tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        list(classes.names),
        str(cfg.get("interpolation", "bicubic")),
        prompts=list(classes.prompts),
    )


def batch_first(visual: nn.Module) -> nn.Module:
    """Run a sequence-first CLIP image transformer (OpenAI's layout, tokens ``(T, N, D)``;
    open_clip's with ``batch_first=False``) batch-first, ``(N, T, D)``, as camx reads tokens.

    The same computation: the transformer stops transposing its input, and each
    ``nn.MultiheadAttention`` inside takes batch-first tensors."""
    for module in visual.modules():
        if getattr(module, "batch_first", True) is False and not isinstance(module, nn.MultiheadAttention):
            setattr(module, "batch_first", True)  # noqa: B010 (a plain attribute of the transformer)
            for attention in module.modules():
                if isinstance(attention, nn.MultiheadAttention):
                    attention.batch_first = True
    return visual


class HFImageTower(nn.Module):
    """A Hugging Face ``CLIPModel``'s image side: ``vision_model`` then ``visual_projection``."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=x).pooler_output)


def hf_zero_shot(module: Any, folder: Path, classes: ClassPrompts | None, transformers: Any) -> ZeroShotHead:
    """A loaded ``CLIPModel`` as a :class:`ZeroShotHead`, its prompts tokenised by the folder's tokenizer."""
    if classes is None:
        raise ModelError(NEEDS_CLASSES)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                               trust_remote_code=False)  # fmt: skip
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of {folder}: {one_line(exc)}") from None
    module.eval()
    tokens = tokenizer(list(classes.prompts), padding=True, return_tensors="pt")
    with torch.inference_mode():
        text = module.get_text_features(**tokens)
    if not isinstance(text, torch.Tensor):  # newer transformers return an output object
        text = text.pooler_output if getattr(text, "pooler_output", None) is not None else text[0]
    visual = HFImageTower(module.vision_model, module.visual_projection)
    return ZeroShotHead(visual, text, float(module.logit_scale.detach().exp()))
