"""The learning rate as a pure function of the step (nanoGPT style): linear warmup, then cosine to a floor."""

from __future__ import annotations

import math


def lr_at(step: int, *, base: float, total: int, warmup: int, floor: float = 0.0) -> float:
    """LR for optimizer step STEP (0-based) of TOTAL; FLOOR is a fraction of BASE reached at the end."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def ramp(step: int, start: int, length: int) -> float:
    """0 before START, then linear to 1 over LENGTH steps (the backbone's warmup after unfreezing)."""
    if step < start:
        return 0.0
    return min((step - start + 1) / length, 1.0) if length else 1.0
