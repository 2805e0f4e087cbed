"""`shardtool show`: a contact sheet of random samples, read by offset through the DALI index."""

from __future__ import annotations

import bisect
import io
import itertools
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from shardtool.errors import ConfigError
from shardtool.manifest import load_manifest
from shardtool.verify import read_index

TILE = 160


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(size)


def contact_sheet(data: str, grid_path: str, split: str | None = None, count: int = 25, seed: int = 0) -> int:
    """Write `count` random samples of `split` as a labelled grid PNG; returns how many were drawn."""
    manifest = load_manifest(data)
    split = split or ("train" if "train" in manifest.splits else next(iter(manifest.splits)))
    shards = manifest.shards(split)
    starts = list(itertools.accumulate((shard["num_samples"] for shard in shards), initial=0))
    if not starts[-1]:
        raise ConfigError(f"split {split!r} is empty")
    picks = random.Random(seed).sample(range(starts[-1]), min(count, starts[-1]))  # O(count), not O(samples)
    chosen = [(shards[bisect.bisect_right(starts, p) - 1], p - starts[bisect.bisect_right(starts, p) - 1])
              for p in picks]
    names = {entry["index"]: (entry.get("levels") or [entry["name"]])[-1] for entry in manifest.classes}
    columns = max(1, round(len(chosen) ** 0.5))
    rows = -(-len(chosen) // columns)
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    indexes: dict[str, list] = {}
    for n, (shard, i) in enumerate(chosen):
        folder = Path(data)
        index = indexes.setdefault(shard["index"], read_index((folder / shard["index"]).read_text()))
        members = {ext: (offset, size) for ext, offset, size, _ in index[i]}
        image_ext = next(ext for ext in members if ext in ("jpg", "png"))
        image = Image.open(io.BytesIO(_read(folder / shard["name"], *members[image_ext]))).convert("RGB")
        info = json.loads(_read(folder / shard["name"], *members["json"]))
        image.thumbnail((TILE, TILE))
        x, y = (n % columns) * TILE, (n // columns) * (TILE + 16)
        sheet.paste(image, (x + (TILE - image.width) // 2, y + (TILE - image.height) // 2))
        caption = names[info["class"]] if info.get("class") is not None else f"_id {info.get('group')}"
        draw.text((x + 2, y + TILE + 2), caption[:26], fill="black")
    sheet.save(grid_path)
    return len(chosen)
