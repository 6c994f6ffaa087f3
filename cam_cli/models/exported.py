"""A model file: an exported program (``torch.export.save``, ``.pt2``) with a
dynamic batch dimension; its input size is read from the program.  TorchScript
files (``torch.jit.save``) are recognised and refused with a reason: TorchScript
modules take no Python forward hooks."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cam_cli.errors import ModelError
from cam_cli.models.base import DEFAULT_INPUT_SIZE, LoadedModel, is_keyword


def _exported_input_size(program: Any, path: Path) -> int | None:
    """The square input size an exported program was traced for, if static.

    Refuses programs exported with a fixed batch size: camx runs batches of
    any size (the probe runs one image, the last batch may be short).
    """
    names = set(program.graph_signature.user_inputs)
    shapes = [
        tuple(node.meta["val"].shape)
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in names and isinstance(node.meta.get("val"), torch.Tensor)
    ]
    if len(shapes) != 1 or len(shapes[0]) != 4:
        raise ModelError(f"exported program {path} takes inputs {shapes}; camx needs one (N, 3, H, W) image batch")
    batch, _, height, width = shapes[0]
    if isinstance(batch, int):
        raise ModelError(
            f"exported program {path} was exported for a fixed batch of {batch}; re-export it with an example "
            "batch of 2 or more and dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)"
        )
    if isinstance(height, int) and isinstance(width, int):
        if height != width:
            raise ModelError(f"exported program {path} takes {height}x{width} inputs; camx feeds square images")
        return height
    return None


def _load_file(path: Path) -> tuple[nn.Module, int | None]:
    """An exported program, unflattened so that its submodules keep their names
    and take forward hooks; and its input size."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("serialized_exported_program.json") or "/models/model.json" in n for n in names):
            try:
                program = torch.export.load(path)
            except Exception as exc:
                message = " ".join(str(exc).split())[:200]
                raise ModelError(f"cannot load exported program {path}: {message}") from None
            size = _exported_input_size(program, path)
            return torch.export.unflatten(program), size
        if any(n.endswith("constants.pkl") or n.endswith("code/__torch__.py") for n in names):
            # torch.jit modules raise "register_forward_hook is not supported on ScriptModules"
            raise ModelError(
                f"{path} is a TorchScript file, and TorchScript modules take no forward hooks, which CAM needs; "
                "save the model with torch.export.save (a .pt2 file) or pass --model package.module:factory"
            )
    raise ModelError(
        f"{path} is neither an exported program nor a TorchScript file; a state dict goes "
        "with --weights PATH and a model name"
    )


def load_exported(model: str, weights: str, num_classes: int | None) -> LoadedModel:
    if not (is_keyword(weights, "DEFAULT") or is_keyword(weights, "NONE")) or num_classes is not None:
        raise ModelError(
            f"--weights and --num-classes do not apply to {model}: an exported program carries its own "
            "weights and head; export the model again with the weights you want"
        )
    module, size = _load_file(Path(model))
    return LoadedModel(module, "in file", size or DEFAULT_INPUT_SIZE)
