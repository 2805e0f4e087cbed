"""The order samples are written in: decided here, once, and recorded in the manifest (options.order).

`shuffled` (the default) writes every split in a seeded permutation of the source, so any stretch of
any shard is a fair sample of its split and a reader that streams shards in order (ours, webdataset's,
timm's, DALI's) gets mixed batches. `source` keeps the source's order (class folders: class by class).
Either way a group's samples (a product's pictures) stay consecutive: `predict --group` streams on it.

- Listings (class folders, CSV manifests, pixel CSVs): a full permutation of the groups. The items
  are held in memory for it; they carry no image bytes except a pixel CSV's raw pixels.
- Byte-range partitions (BSON dumps, too big to hold): the partitions (about 256 documents each) are
  permuted in full (the reader knows their bounds: 8 bytes each), a worker reads MIX_PARTITIONS of
  them from scattered places in the dump and permutes their products together, so a shard is a mix of
  a few hundred products from several random places of the dump, and memory stays flat.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import TypeVar

from shardtool.sample import Item, Skip

MIX_PARTITIONS = 4  # byte ranges read and mixed together by one worker task (~1,000 products)

T = TypeVar("T")


def order_rng(seed: int, *where: object) -> random.Random:
    return random.Random("/".join(map(str, (seed, "order", *where))))


def permute_groups(items: Iterable[Item], rng: random.Random) -> list[Item]:
    """ITEMS with their groups in a random order; a group's items stay together, in their own order.
    A group split across the source (a product's rows scattered in a CSV) is gathered at its first place.
    The reader's Skips come first, in the source's order (they take no place in a shard, and
    rejects.jsonl then lists them as the source has them)."""
    skips: list[Item] = []
    groups: dict[str, list[Item]] = {}
    for item in items:
        if isinstance(item, Skip):
            skips.append(item)
        else:
            groups.setdefault(item.group or item.key, []).append(item)
    blocks = list(groups.values())
    rng.shuffle(blocks)
    return skips + [item for block in blocks for item in block]


def ordered(items: Iterable[Item], order: str, seed: int) -> Iterator[Item]:
    """A listing's items in the pack order."""
    if order == "source":
        return iter(items)
    return iter(permute_groups(items, order_rng(seed, "listing")))


def ordered_partitions(spans: Iterable[T], order: str, seed: int) -> list[T]:
    """A partitioned source's byte ranges in the pack order (consumed MIX_PARTITIONS per worker task)."""
    spans = list(spans)
    if order == "shuffled":
        order_rng(seed, "partitions").shuffle(spans)
    return spans
