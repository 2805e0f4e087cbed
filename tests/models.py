"""Small real checkpoints for the inference, export and serve tests.

    shapes_checkpoint:   EfficientNet-Lite0's frozen features + a probe head on generated shapes (64 px)
    clothing_checkpoint: the same on 12 images per class of clothing-small's train folder (224 px), real
                         photos and class names; its predictions are far from perfect, which is fine:
                         the tests compare answers between paths, and read labels, not accuracy
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from shardtool.synth import make_shapes
from tests.conftest import run_cli
from tests.zygote import run_trainer as trainer  # `python -m trainer ARGS`


@dataclass(frozen=True)
class Trained:
    ckpt: Path
    data: Path  # its packed shards
    source: Path  # the class folders it was packed from


def probe_checkpoint(source: Path, out: Path, image_size: int) -> Trained:
    data = out / "shards"
    packed = run_cli("pack", source, data, "--split", "val=0.25", "--stratify", "--workers", "0",
                     "--resize", f"shorter:{round(image_size / 0.875)}")
    assert packed.exit_code == 0, packed.output
    ckpt = out / "probe.pt"
    done = trainer("probe", data, "--image-size", image_size, "--out", out / "features", "--save", ckpt,
                   "--workers", "0")
    assert done.returncode == 0, done.stderr
    return Trained(ckpt, data, source)


def shapes_checkpoint(out: Path) -> Trained:
    source = make_shapes(out / "shapes", per_class=30, size=64, seed=1)
    return probe_checkpoint(source, out, 64)


def clothing_checkpoint(real: Path, out: Path, per_class: int = 12) -> Trained:
    source = out / "clothing"
    for folder in sorted((real / "clothing-small" / "train").iterdir()):
        (source / folder.name).mkdir(parents=True)
        for file in sorted(folder.glob("*.jpg"))[:per_class]:
            shutil.copyfile(file, source / folder.name / file.name)
    return probe_checkpoint(source, out, 224)
