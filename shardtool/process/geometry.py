"""Resize geometry shared by every backend, so PIL and DALI produce the same sizes.

    shorter:N  scale so the shorter side is N        longer:N  scale so the longer side is N
    fit:N      shorter side to N, centre-crop NxN    pad:N     longer side to N, centred on black NxN
    squash:N   NxN, aspect ratio not kept            none      unchanged
"""

from __future__ import annotations

from dataclasses import dataclass

from shardtool.config import Resize


@dataclass(frozen=True)
class Plan:
    """Resize the `source` size to `scaled`, then paste it at `offset` on a `canvas` (black where uncovered)."""

    source: tuple[int, int]
    scaled: tuple[int, int]
    canvas: tuple[int, int]
    offset: tuple[int, int]  # where the scaled image's top-left goes on the canvas (negative: cropped)

    @property
    def identity(self) -> bool:
        return self.source == self.scaled == self.canvas and self.offset == (0, 0)


def _scale(w: int, h: int, factor: float) -> tuple[int, int]:
    return max(1, round(w * factor)), max(1, round(h * factor))


def plan(width: int, height: int, resize: Resize) -> Plan:
    n, mode = resize.size, resize.mode
    if mode == "none":
        scaled = (width, height)
    elif mode in ("shorter", "fit"):
        scaled = _scale(width, height, n / min(width, height))
    elif mode in ("longer", "pad"):
        scaled = _scale(width, height, n / max(width, height))
    else:  # squash
        scaled = (n, n)
    if mode in ("fit", "pad"):
        canvas = (n, n)
        offset = ((n - scaled[0]) // 2, (n - scaled[1]) // 2)
        if mode == "fit":  # the shorter side is exactly n: crop the longer one around the centre
            scaled = (max(scaled[0], n), max(scaled[1], n))
            offset = (-((scaled[0] - n) // 2), -((scaled[1] - n) // 2))
        return Plan((width, height), scaled, canvas, offset)
    return Plan((width, height), scaled, scaled, (0, 0))
