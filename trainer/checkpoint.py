"""Checkpoints are plain dicts of tensors and primitives, written atomically, read with weights_only=True.

    {"model", "optimizer", "scaler", "epoch", "step", "batch", "partial", "rng", "best", "config", "classes"}

`epoch` is the epoch in progress (0-based) and `batch` how many of its batches are done, so a resumed
run starts at exactly the next batch; `partial` holds that epoch's running train sums.
"""

from __future__ import annotations

import os
import pickle
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

from shardtool.atomic import replacing
from trainer.errors import ConfigError

FORMAT = "trainer-checkpoint/1"
REFUSED = "is not a trainer checkpoint, or not one this version can load safely; it was not loaded"
# What torch's weights-only unpickler raises on bytes that are no pickle of tensors (a text file, random bytes)
NOT_A_PICKLE = (pickle.UnpicklingError, KeyError, struct.error, IndexError, TypeError, AttributeError,
                UnicodeDecodeError, OverflowError)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file, fsync, then os.replace: a kill never leaves half a checkpoint."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise about a file we refuse
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._weights_only_unpickler")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except NOT_A_PICKLE:  # not plain tensors and values, or not a pickle
        raise ConfigError(f"{path} {REFUSED}") from None  # not torch's text: it advises weights_only=False
    except (RuntimeError, EOFError, ValueError) as error:  # a damaged archive: torch says what is wrong
        raise ConfigError(f"{path} is not a trainer checkpoint: {str(error).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a trainer checkpoint (made by another tool or version)")
    return state


def check_classes(state: dict[str, Any], class_names: list[str], where: str) -> None:
    """A checkpoint only fits a dataset with the same classes in the same order."""
    theirs = state["classes"]
    if theirs != class_names:
        diff = next((i for i, (a, b) in enumerate(zip(theirs, class_names)) if a != b), min(len(theirs), len(class_names)))
        raise ConfigError(f"the checkpoint was trained on other classes than {where} "
                          f"({len(theirs)} vs {len(class_names)} classes, first difference at index {diff})")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
