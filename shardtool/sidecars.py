"""The small indexes other readers look for beside the shards, all derived from dataset.json.

dataset.json stays the one source of truth: these files are rewritten from it by every pack and by
`shardtool index`, and nothing of ours reads them.

| file | read by |
|---|---|
| `_info.json` | timm's webdataset reader: `timm.data.create_dataset("wds/NAME", root=OUT, split=SPLIT)` and `train.py --dataset wds/NAME --data-dir OUT` take sample counts and shard lists from it instead of scanning |
| `{split}.wids.json` | `wids.ShardListDataset(OUT/train.wids.json)`: random access by sample index (`wids-shard-index-v1`, relative urls) |
| `classes.txt` | one class name per line, line i naming class i (timm's `--class-map` format; any tool's label names) |

The layouts are those timm's reader (timm/data/readers/reader_wds.py) and wids' index loader parse;
tests/test_interop.py reads our output with each tool, unchanged.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from shardtool.manifest import write_text_atomic

TIMM_INFO = "_info.json"
CLASSES = "classes.txt"
WIDS_SUFFIX = ".wids.json"
NAMES = re.compile(r"_info\.json|classes\.txt|[^/]+\.wids\.json")  # files in OUT these are


def dataset_name(manifest: dict[str, Any]) -> str:
    """A short name for the dataset: the source's file or folder name, as the tools display it."""
    path = str(manifest.get("source", {}).get("path") or "dataset")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path.rstrip("/")).name.split(".")[0]) or "dataset"


def timm_info(manifest: dict[str, Any]) -> dict[str, Any]:
    """timm's `_info.json`: per split its name, sample count, shard file names (a list: timm makes it a
    tuple; a brace pattern string would be iterated character by character) and per-shard counts."""
    splits = {name: {"name": name, "num_samples": split["num_samples"],
                     "filenames": [shard["name"] for shard in split["shards"]],
                     "shard_lengths": [shard["num_samples"] for shard in split["shards"]]}
              for name, split in manifest["splits"].items()}
    return {"name": dataset_name(manifest), "num_classes": len(manifest["classes"]), "splits": splits}


def wids_index(manifest: dict[str, Any], split: str) -> dict[str, Any]:
    """A `wids-shard-index-v1`: wids resolves each relative url against the index file's folder."""
    shards = [{"url": shard["name"], "nsamples": shard["num_samples"], "filesize": shard["bytes"]}
              for shard in manifest["splits"][split]["shards"]]
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": f"{dataset_name(manifest)}-{split}",
            "shardlist": shards}


def sidecars(manifest: dict[str, Any]) -> dict[str, str]:
    """File name in OUT -> its text."""
    files = {TIMM_INFO: _json(timm_info(manifest)),
             CLASSES: "".join(f"{entry['name']}\n" for entry in manifest["classes"])}
    for split in manifest["splits"]:
        files[split + WIDS_SUFFIX] = _json(wids_index(manifest, split))
    return files


def write_sidecars(out: str | os.PathLike[str], manifest: dict[str, Any]) -> list[str]:
    """Write every sidecar (tmp name then rename, so a reader never sees half a file); returns their names.
    Sidecars of splits the manifest no longer has are removed."""
    out = Path(out)
    files = sidecars(manifest)
    for stale in out.glob("*" + WIDS_SUFFIX):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        write_text_atomic(out / name, text)
    return sorted(files)


def _json(data: Any) -> str:
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"
