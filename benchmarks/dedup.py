"""Pictures with the same bytes in the real datasets here: what `shardtool pack` reports about them.

    python -m benchmarks.dedup [--datasets clothing-small,fb-marketplace,cdiscount,fashion-mnist] [--json]

Each dataset is packed with `--dedup keep` (every picture written, duplicates only reported) and the split
settings the README's accuracy runs use (benchmarks/common.py's pack_args: clothing-small from its own
folders at shorter:256; FB Marketplace split by product val=0.15,test=0.15; Fashion-MNIST stratified
val=0.15,test=0.15) or, for the Cdiscount example dump, the README's BSON command (--categories,
--split val=0.05, --verify header). A row holds the manifest's report.duplicates counts: groups of pictures
with the same bytes and the pictures in them, extra copies within each split, pictures of a held-out split
whose bytes train has (what --dedup drop-leaks drops), how many of those groups span different product groups
(what grouping by product cannot catch), the first example group; what the report costs (the pack's wall
time, the bytes each picture's entry adds to the journal, where the digests ride); and whether a perceptual
hash would find more: groups of written pictures whose 64-bit dHash is equal though their bytes differ.
Results: results/dedup.{json,md}; the table with its reading is docs/packing-duplicates.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import emit, pack_args, real_data, rel, tool

DATASETS = ("clothing-small", "fb-marketplace", "cdiscount", "fashion-mnist")
COLUMNS = ["name", "seen", "written", "groups", "pictures", "within", "leaks", "leak_groups_other_products",
           "example", "pack_s", "journal_bytes_per_picture", "dhash_groups", "dhash_pictures"]


def dhash(data: bytes) -> int:
    """A 64-bit difference hash of an encoded image: 9x8 grey thumbnail, is each pixel brighter than its left
    neighbour. Hand-written in a few lines (imagehash, which has it, is not a dependency here)."""
    grey = np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((9, 8), Image.Resampling.BILINEAR), np.int16)
    return int.from_bytes(np.packbits(grey[:, 1:] > grey[:, :-1]).tobytes(), "big")


def dhash_groups(out: Path) -> tuple[int, int, list[str]]:
    """Would a perceptual hash find more? Groups of written pictures with equal dHash but different bytes
    (groups, pictures with distinct bytes in them, the first group's members), read back from OUT's shards."""
    found: dict[int, dict[str, str]] = {}  # dHash -> written bytes' sha256 -> one member name
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith((".jpg", ".png")):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    found.setdefault(dhash(data), {}).setdefault(hashlib.sha256(data).hexdigest(), member.name)
    groups = [sorted(names.values()) for names in found.values() if len(names) > 1]
    return len(groups), sum(map(len, groups)), min(groups, default=[])


def dataset_args(name: str, root: Path) -> list[str]:
    """`shardtool pack` arguments for NAME (without OUT)."""
    if name == "cdiscount":
        return [str(root / name / "train_example.bson"), "--categories", str(root / name / "category_names.csv"),
                "--split", "val=0.05", "--verify", "header"]
    return pack_args(name, root)


def measure(name: str, root: Path, scratch: Path) -> dict[str, Any]:
    """Pack NAME into SCRATCH with --dedup keep; its report.duplicates as a row."""
    source, *options = dataset_args(name, root)
    out = scratch / name
    argv = [tool("shardtool"), "pack", source, str(out), *options, "--dedup", "keep", "--json"]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"pack of {name} failed: {done.stderr.strip()[-2000:]}")
    report = json.loads(done.stdout)
    duplicates = report["duplicates"]
    within = ", ".join(f"{split} {counts['copies']}" for split, counts in duplicates["exact_within"].items())
    pairs = {pair: counts for pair, counts in duplicates["exact_across"].items() if pair.startswith("train/")}
    journal = [json.loads(line) for line in (out / ".shardtool" / "journal.jsonl").read_text().splitlines()]
    pictures = [record["pictures"] for record in journal if "pictures" in record]
    entry_bytes = sum(len(json.dumps(entries, ensure_ascii=False)) for entries in pictures)
    shown = [rel(a) if Path(a).is_absolute() else a for a in ["shardtool", "pack", source, "OUT", *options]]
    near, near_pictures, near_example = dhash_groups(out)
    return {"name": name, "seen": report["seen"], "written": report["written"], "groups": duplicates["groups"],
            "pictures": duplicates["pictures"], "within": within,
            "leaks": ", ".join(f"{pair.split('/')[1]} {counts['pictures']}" for pair, counts in pairs.items()),
            "leak_groups_other_products": sum(counts["other_groups"] for counts in pairs.values()),
            "example": " = ".join(duplicates["examples"][0]) if duplicates["examples"] else "",
            "pack_s": round(seconds, 1),
            "journal_bytes_per_picture": round(entry_bytes / max(sum(map(len, pictures)), 1)),
            "dhash_groups": near, "dhash_pictures": near_pictures, "dhash_example": near_example,
            "duplicates": duplicates, "command": " ".join(shown + ["--dedup", "keep", "--json"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root, results, notes = real_data(), [], []
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as scratch:
        for name in args.datasets.split(","):
            if not (root / name).is_dir():
                notes.append(f"{name}: not measured, no {rel(root / name)}")
                continue
            results.append(measure(name, root, Path(scratch)))
    settings = {"data": rel(root), "dedup": "keep", "date": datetime.date.today().isoformat(),
                "hash": results[0]["duplicates"]["hash"] if results else None}
    emit("dedup", settings, results, COLUMNS, args.json, notes)


if __name__ == "__main__":
    main()
