"""The runtime under everything: which device, which precision, how big a batch it takes.

    --device auto|cpu|cuda|cuda:N -> resolve_device (one GPU per process under torchrun)
    --amp auto|bf16|fp16|none     -> make_amp -> Amp (autocast context, the fp16 GradScaler)
    --batch-size 0                -> default_batch_size (from the device's memory and the image side)
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from shardtool.options import check_device
from trainer.distributed import Dist
from trainer.errors import ConfigError


@dataclass
class Amp:
    dtype: torch.dtype | None  # None: full precision
    device_type: str
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> Any:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_device(name: str, dist: Dist | None = None) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a device. Under torchrun (DIST with world > 1) a CUDA device is always
    cuda:LOCAL_RANK, one GPU per process, whatever index was asked for: NCCL fails with two ranks on one."""
    check_device("--device", name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device here (use cpu or auto)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    if name.startswith("cuda") and dist is not None and dist.world > 1:
        return torch.device("cuda", dist.local_rank)
    return torch.device(name)


BATCH_PER_GB = 8  # samples per GB of GPU memory at 224 px (EfficientNet-Lite0, bf16: not measured on a GPU yet)


def default_batch_size(device: torch.device, image_size: int) -> int:
    """--batch-size 0: 32 on a CPU; on a GPU BATCH_PER_GB per GB of its memory, scaled by (224 / side)^2, the
    power of 2 below that, from 32 to 512 (an 80 GB card: 512 at 224 px, 128 at 448; 24 GB: 128)."""
    if device.type != "cuda":
        return 32
    gigabytes = torch.cuda.get_device_properties(device).total_memory / 2**30
    fits = BATCH_PER_GB * gigabytes * (224 / image_size) ** 2
    return min(512, max(32, 2 ** int(math.log2(max(fits, 1)))))


def make_amp(mode: str, device: torch.device) -> Amp:
    """auto: bf16 on a GPU that has it (else fp16 with a scaler); bf16 on a CPU with native bf16 (4x here)."""
    if mode == "auto":
        if device.type == "cuda":  # native bf16 only (Ampere and later): V100/T4 emulate it, slowly
            mode = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        else:
            mode = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "none"
    if mode == "none":
        return Amp(None, device.type)
    if mode == "fp16":
        return Amp(torch.float16, device.type, torch.amp.GradScaler(device.type))
    return Amp(torch.bfloat16, device.type)
