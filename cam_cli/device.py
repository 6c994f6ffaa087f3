"""Devices and the process settings that make them fast: choosing the device,
glibc's allocator on the CPU, IEEE float32 on CUDA."""

from __future__ import annotations

import ctypes
import gc
import sys

import torch

from cam_cli.errors import DeviceError

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an absent device is an error."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"device {spec} requested but MPS is not available on this machine")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def emulated_precision_note(device: torch.device, precision: str) -> str | None:
    """A one-line note when ``--precision`` asks the CPU for a type it has no units for.

    oneDNN runs bfloat16 (float16) convolutions and matrix products natively only where the
    CPU has AVX512-BF16 or AMX (AVX512-FP16 or AMX-FP16); elsewhere autocast still works, but
    every such operation is emulated and the model runs several times slower than in float32.
    """
    if device.type != "cpu" or precision not in ("bf16", "fp16"):
        return None
    mkldnn = getattr(torch.ops, "mkldnn", None)
    check = getattr(mkldnn, f"_is_mkldnn_{precision}_supported", None) if mkldnn is not None else None
    if check is None or check():
        return None
    units = "AVX512-BF16 or AMX" if precision == "bf16" else "AVX512-FP16 or AMX-FP16"
    return (
        f"this CPU has no {precision} units ({units}): --precision {precision} is emulated here and usually "
        "runs slower than the default fp32"
    )


_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_allocator() -> bool:
    """Keep glibc malloc from mapping and unmapping every large activation.

    Batch activations are above glibc's mmap threshold, so by default every
    layer maps fresh zeroed pages and returns them afterwards (hundreds of
    thousands of page faults per batch). Serving them from the heap and not
    trimming it (the effect of ``MALLOC_MMAP_MAX_=0`` and a high
    ``MALLOC_TRIM_THRESHOLD_``) makes CPU inference markedly faster. Applies to
    this process and to DataLoader workers forked after it; a no-op off glibc.
    Returns whether the settings were applied.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            _allocator_tuned = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
        except (OSError, AttributeError):
            _allocator_tuned = False
    return _allocator_tuned


_allocator_tuned: bool | None = None


def freeze_imported_objects() -> None:
    """Leave what the imports made (torch's hundreds of thousands of objects) out of the
    garbage collector's passes, once per process: a full pass over them costs about
    0.2 s, one falls in the first second of every run, and more follow in a long
    one (``bench/startup.py``). Objects made later are collected as usual."""
    if not _frozen:
        gc.freeze()
        _frozen.append(True)


_frozen: list[bool] = []


def use_ieee_fp32() -> None:
    """Make float32 mean IEEE float32 on CUDA.

    cuDNN runs float32 convolutions in TF32 by default on Ampere and later
    GPUs (about 1e-3 relative error), which would make ``--precision fp32``
    maps differ from the CPU's by far more than float32 rounding. Matrix
    products already default to full float32.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = "ieee"
    else:  # torch before 2.9
        torch.backends.cudnn.allow_tf32 = False


def use_channels_last(device: torch.device) -> bool:
    """Whether the model runs in channels-last memory format: on CUDA, and on the CPU
    too, where oneDNN's convolutions are faster in it (``bench/throughput.py``:
    floor-channels-last); ``CAMX_CHANNELS_LAST=0`` turns it off."""
    import os

    if os.environ.get("CAMX_CHANNELS_LAST", "1") == "0":
        return False
    return device.type in ("cuda", "cpu")
