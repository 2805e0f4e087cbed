"""Sampling that is not uniform, still streamed and still exact: how often an epoch draws each sample, which
blocks it reads for that and how often, all pure functions of (seed, epoch) and the manifest's counts.

`--sampling` gives each class c its share p_c of an epoch (uniform: its share of the samples; balanced: the
same for every class; sqrt: in proportion to the square root of its count; weights:FILE: to the file's
weight), `--mix` each DATA its share q (without it the DATA are one pool). A sample of class c in DATA s is
then drawn `rate = E q p_c / N_sc` times in an epoch of E draws, in expectation.

The manifest counts each shard's classes but does not say which sample holds which, so the plan works on
blocks (plan.py's 16 samples in a row) from their shard's counts:

- a block is read `rho` times an epoch, in expectation: the largest rate of a class its shard holds, capped
  at 1 (a shard with a rare class is read whole; one of common classes only in part), and raised where a
  read would otherwise draw one class more often than its block has samples (a shard rich in a rare class
  is then read at several places of the epoch instead of drawn as a lump at one; an epoch reads at most
  one pass over the data plus one sample per draw);
- each read draws each of its samples `rate / rho` times, rounded systematically by class (draws.py),
  decided from the sample's label as the block is read;

so every sample is drawn `rate` times in expectation, whatever its block holds. The epoch's reads are the
blocks, each floor(rho) or ceil(rho) times (rounded systematically too: a shard, or the shards of a class
packed in a row, gets its expected reads to within one), shuffled by (seed, epoch); each slot (a rank's
loader worker, sized as plan.py sizes it) takes the reads whose expected draws fall in its part of the
epoch, so no read is shared between slots, and tops up with reads of its own (blocks drawn in proportion
to rho, seeded by seed, epoch, rank and worker) until it has drawn exactly its size: every rank gets
E // world draws. On 100:10:1 shards, shuffled or packed class by class, an epoch's class counts are the
expected ones to within a few percent (tests/test_sampling.py); a class drawn in lumps comes a little short
(draws.py says how much).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path

from trainer.dataset import Shard, is_url
from trainer.errors import ConfigError

REPEATS = 1.0  # a read's expected draws of any one class, per sample of its block; more: read the block more often
SHARES: dict[str, Callable[[int], float]] = {"uniform": float, "balanced": lambda n: float(n > 0), "sqrt": math.sqrt}
MODES = (*SHARES, "weights:FILE")


@dataclass(frozen=True)
class Sampling:
    """What the plan needs: for each DATA (source) and class, the draws of one sample per epoch."""

    rates: tuple[tuple[float, ...], ...]  # [source][class]; one number for all classes: uniform within it
    epoch_size: int  # draws in an epoch, all ranks together

    @property
    def fingerprint(self) -> str:
        """Changes whenever the draws would: kept in the checkpoint, so a resume cannot draw otherwise."""
        return hashlib.sha256(repr(self).encode()).hexdigest()[:12]

    def rate(self, source: int, label: int) -> float:
        rates = self.rates[source]
        return rates[0] if len(rates) == 1 else rates[label]

    def reads(self, shard: Shard) -> tuple[float, float]:
        """(reads of each block of SHARD per epoch, draws of one of its samples per read), in expectation."""
        rates = self.rates[shard.source]
        counts = ((0, shard.num_samples),) if len(rates) == 1 else shard.class_counts or ()
        masses = [rates[c] * n / max(shard.num_samples, 1) for c, n in counts]  # draws per sample, by class
        top = max((rates[c] for c, n in counts), default=0.0)
        rho = max(min(top, 1.0), max(masses, default=0.0) / REPEATS)
        return rho, sum(masses) / rho if rho else 0.0


def parse_sampling(text: str) -> tuple[str, str]:
    """--sampling -> (mode, weights file or "")."""
    mode, _, path = text.partition(":")
    if (mode in SHARES and not path) or (mode == "weights" and path):
        return mode, path
    raise ConfigError(f"--sampling must be one of {', '.join(MODES)}, not {text!r}")


def class_shares(mode: str, counts: Sequence[int], weights: Sequence[float] | None = None) -> list[float]:
    """The share of an epoch each class gets under MODE (weights: the file's, by class index), from COUNTS
    (samples per class); a class without samples gets none."""
    raw = [w * (n > 0) for w, n in zip(weights, counts)] if weights is not None else [SHARES[mode](n) for n in counts]
    total = sum(raw)
    if not total:
        raise ConfigError(f"--sampling {mode}: no class with a weight above 0 has training samples")
    return [share / total for share in raw]


def make_sampling(mode: str, shards: Sequence[Shard], class_names: list[str], mix: Sequence[float] | None = None,
                  epoch_size: int = 0) -> Sampling | None:
    """The Sampling of training on SHARDS (from their class counts: see with_class_counts); None where today's
    plan is exact (uniform, one pool, an epoch of every sample once). MIX: each source's share, summing to 1."""
    kind, path = parse_sampling(mode)
    total = sum(shard.num_samples for shard in shards)
    size = epoch_size or total
    if kind == "uniform" and mix is None and size == total:
        return None
    weights = read_class_weights(path, class_names) if path else None
    sources = len(mix) if mix is not None else max((shard.source for shard in shards), default=0) + 1
    groups = [range(sources)] if mix is None else [range(i, i + 1) for i in range(sources)]
    rates: list[tuple[float, ...]] = [()] * sources
    for group, share in zip(groups, [1.0] if mix is None else mix, strict=True):
        members = [shard for shard in shards if shard.source in group]
        if not sum(shard.num_samples for shard in members):
            raise ConfigError(f"--mix: DATA number {group[0] + 1} has no training samples to draw from")
        for source in group:
            rates[source] = group_rates(kind, members, len(class_names), size * share, weights)
    return Sampling(tuple(rates), size)


def group_rates(kind: str, shards: Sequence[Shard], num_classes: int, draws: float,
                weights: Sequence[float] | None) -> tuple[float, ...]:
    """Draws per sample of each class when SHARDS get DRAWS draws an epoch."""
    if kind == "uniform":
        return (draws / sum(shard.num_samples for shard in shards),)
    counts = [0] * num_classes
    for shard in shards:
        for label, n in shard.class_counts or ():
            counts[label] += n
    shares = class_shares(kind, counts, weights)
    return tuple(draws * share / n if n else 0.0 for share, n in zip(shares, counts))


def read_class_weights(path: str, class_names: list[str]) -> list[float]:
    """weights:FILE, JSON {class name: weight} or CSV lines `class,weight` (a `class,weight` header allowed),
    as weights by class index; every class needs one (0 leaves it out). Anything else is one line."""
    where = f"--sampling weights:{path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{where}: cannot read it ({type(error).__name__})") from None
    pairs = _json_pairs(text, where) if text.lstrip().startswith("{") else _csv_pairs(text, where)
    index = {name: i for i, name in enumerate(class_names)}
    weights: list[float | None] = [None] * len(class_names)
    for name, value in pairs:
        if name not in index:
            raise ConfigError(f"{where}: {name[:60]!r} is not a class of DATA (it has {len(class_names)}, such as "
                              f"{class_names[0][:40]!r})")
        if weights[index[name]] is not None:
            raise ConfigError(f"{where}: class {name[:60]!r} has two weights")
        weights[index[name]] = _weight(value, name, where)
    missing = [name for name, weight in zip(class_names, weights) if weight is None]
    if missing:
        raise ConfigError(f"{where}: no weight for class {missing[0][:60]!r} ({len(missing)} of {len(class_names)} "
                          "classes have none); give every class one (0 leaves it out)")
    return [float(w) for w in weights]  # type: ignore[arg-type]


def _json_pairs(text: str, where: str) -> list[tuple[str, object]]:
    try:
        pairs = json.loads(text, object_pairs_hook=lambda items: items)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where} is not valid JSON: {error.msg} at line {error.lineno}") from None
    if not isinstance(pairs, list):
        raise ConfigError(f"{where} must be one JSON object of class name: weight")
    return pairs


def _csv_pairs(text: str, where: str) -> list[tuple[str, object]]:
    import csv

    pairs = []
    for number, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row or (number == 1 and [cell.strip().lower() for cell in row] == ["class", "weight"]):
            continue
        if len(row) != 2:
            raise ConfigError(f"{where}: line {number} is not `class,weight` (JSON or CSV of class,weight)")
        pairs.append((row[0].strip(), row[1].strip()))
    return pairs


def _weight(value: object, name: str, where: str) -> float:
    """A finite number >= 0, from JSON (a number) or CSV (its text)."""
    try:
        weight = float(value) if not isinstance(value, bool) and isinstance(value, (int, float, str)) else math.nan
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"{where}: the weight of {name[:60]!r} is {str(value)[:20]!r}: a weight is a finite "
                          "number >= 0")
    return weight


def with_class_counts(shards: Sequence[Shard], mode: str) -> tuple[Shard, ...]:
    """SHARDS with their class counts, which MODE needs unless uniform: the manifest's, or for a local shard
    of a manifest from before them its .cls members read once; a URL's are a one-line error."""
    if parse_sampling(mode)[0] == "uniform" or all(shard.class_counts is not None for shard in shards):
        return tuple(shards)
    for shard in shards:
        if shard.class_counts is None and (is_url(shard.url) or not Path(shard.index_url).is_file()):
            raise ConfigError(f"--sampling {mode} plans from each shard's class counts, and the manifest of "
                              f"{shard.url} has none (packed before them): repack it, or run `shardtool index` "
                              "on its tars")
    return tuple(shard if shard.class_counts is not None else replace(shard, class_counts=read_class_counts(shard))
                 for shard in shards)


@functools.lru_cache(maxsize=None)
def read_class_counts(shard: Shard) -> tuple[tuple[int, int], ...]:
    """A local shard's (class, samples), from its .cls members; a label that is no class index is left out
    (the loader counts it as a bad sample)."""
    return tuple(sorted(Counter(label for label in read_labels(shard) if label is not None).items()))


def read_labels(shard: Shard) -> list[int | None]:
    """A local shard's labels in sample order, from its .cls members read at their .idx offsets; None for a
    sample without one or whose label is no class index."""
    labels: list[int | None] = []
    with open(shard.index_url, encoding="utf-8") as index, open(shard.url, "rb") as tar:
        index.readline()
        for line in index:
            fields, label = line.split(), None
            for ext, offset, size in zip(fields[::4], fields[1::4], fields[2::4]):
                if ext == "cls":
                    tar.seek(int(offset))
                    text = tar.read(int(size)).strip()
                    label = int(text) if text.isdigit() else None
            labels.append(label)
    return labels


def systematic(values: Sequence[float], offset: float, keys: Sequence[object] | None = None) -> list[int]:
    """VALUES rounded to whole numbers, each VALUE in expectation over OFFSET (uniform in [0, 1)), and those of
    one key (all, without KEYS) summing to their sum's floor or ceil: systematic rounding, one running sum
    per key."""
    totals: dict[object, float] = {}
    out = []
    for value, key in zip(values, keys if keys is not None else [None] * len(values)):
        before = totals.get(key, 0.0)
        totals[key] = before + value
        out.append(math.floor(before + value + offset) - math.floor(before + offset))
    return out


def epoch_reads(rhos: Sequence[float], seed: int, epoch: int) -> list[int]:
    """The epoch's reads in order, as block numbers: block i floor(rhos[i]) or ceil(rhos[i]) times, shuffled;
    rounded systematically, so any run of consecutive blocks (a shard, the shards of one class) is read its
    expected number of times to within one read."""
    times = systematic(rhos, random.Random(f"{seed}/{epoch}/reads").random())
    order = [block for block, n in enumerate(times) for _ in range(n)]
    random.Random(f"{seed}/{epoch}/draws").shuffle(order)
    return order


def slot_reads(order: Sequence[int], draws: Sequence[float], lo: float, hi: float) -> list[int]:
    """Places in ORDER whose read falls in [LO, HI) of the epoch's expected draws (by its middle; DRAWS: the
    expected draws of one read of each block): the slot's reads. Every place belongs to one slot at most."""
    mine, done = [], 0.0
    for place, block in enumerate(order):
        if lo <= done + draws[block] / 2 < hi:
            mine.append(place)
        done += draws[block]
    return mine


def top_up_reads(rhos: Sequence[float], seed: int, epoch: int, rank: int, worker: int) -> Iterator[int]:
    """Blocks drawn one at a time in proportion to their rho, for one slot alone: its reads past its share
    of the epoch's, as many as it takes to draw its size."""
    cumulative = list(accumulate(rhos))
    rng = random.Random(f"{seed}/{epoch}/{rank}/{worker}/top-up")
    while cumulative and cumulative[-1] > 0:
        yield bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
