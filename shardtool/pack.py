"""`pack`: readers -> Sample -> processor -> Sample | Skip -> sinks (shards, .idx) -> manifest, last.

    items = open_reader(config)                  # Sample | Skip, stable order, no bytes decoded
    items = known_categories(items, categories)  # labels missing from --categories become skips
    items = ordered(items, config.order, seed)   # the pack order: groups permuted (order.py), or the source's
    items = assign_splits(items, splitter)       # every item knows its split
    items = skip_done(items, journal.consumed()) # a resumed run skips what its journal accounts for
    runs = ordered_map(encode_batch, items)      # worker processes: read and hash the bytes (dedup.py), decode,
                                                 # RGB, resize (PIL or DALI), encode, tar members: a Run per batch
For a reader with byte-range partitions (a BSON dump) the workers do the reading and the splits too
(a few permuted ranges per task, their products mixed), and a resumed run's finished items are
dropped after them (see packed_runs).
    for run in runs: dedup.check(run)            # --dedup: drop pictures whose bytes came before (dedup.py)
        for each stretch of one split: sinks[split].add(stretch, run.data)
With --dedup drop-leaks (or drop-both) the plan runs twice, train's items first, then the other splits'.

The workers are local processes (parallel.Workers) or, with --distributor ray, Ray tasks
(ray_workers.RayWorkers); either way the Runs come back in order to this one writer, so the bytes do
not depend on where they were made. With OUT a URL, OUT here is a local staging folder and each sealed
shard is uploaded before it is journaled, the manifest last (publish.py).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import PIL

from shardtool import __version__
from shardtool.background import Background
from shardtool.classes import Categories, class_entries, hierarchy, known_categories, read_categories
from shardtool.config import PackConfig
from shardtool.dedup import NAME as DUPLICATES
from shardtool.dedup import DROPPED, Dedup, find_duplicates, in_phase, phases, read_inputs, write_duplicates
from shardtool.errors import ConfigError, PackError
from shardtool.journal import Journal
from shardtool.listing import Listing
from shardtool.manifest import NAME as MANIFEST
from shardtool.manifest import build_manifest, write_json_atomic
from shardtool.order import MIX_PARTITIONS, order_rng, ordered, ordered_partitions, permute_groups
from shardtool.parallel import Workers, check_not_starting_worker, ordered_map
from shardtool.process import dali, pil
from shardtool.process.pil import OutputSpec
from shardtool.publish import Publisher
from shardtool.readers import Reader, open_reader
from shardtool.sample import Item, Sample, Skip
from shardtool.sidecars import NAMES as SIDECAR_NAMES
from shardtool.sidecars import write_sidecars
from shardtool.sink import Run, SplitSink, encode_run
from shardtool.splits import Resumed, Splitter, assign_splits, skip_done, unit_hash

PARALLEL_SCAN_BYTES = 256 << 20  # auto: smaller dumps are scanned in-process (see _scan_in_workers)
SEALS = 16  # finished shards that may wait for their fsync (page cache, not our memory)
_OURS = re.compile(rf"(dataset\.json|rejects\.jsonl|duplicates\.json|\.shardtool|.+-\d{{6}}\.(tar|idx)|"
                   rf"{SIDECAR_NAMES.pattern})(\.tmp)?")


@dataclass
class Progress:
    done: int
    total: int
    written: int
    skipped: int


@dataclass
class Scan:
    labels: set[str]
    total: int
    groups_by_label: dict[str, array[float]]  # unit hashes of each class's groups (only with --stratify)
    listing: Listing  # what the plan is made from: a resume needs the same (listing.py)


def scan(reader: Reader, categories: Categories | None, seed: int, stratify: bool, workers: Workers,
         listing: Listing) -> Scan:
    """One cheap pass over the reader (no image bytes): labels, count, groups for stratifying, listing.

    With --stratify this keeps 8 bytes per group (a Cdiscount product); without, memory is flat.
    """
    found = Scan(set(), 0, {}, listing)
    last: tuple[str, str] | None = None
    for label, group, count in _labels(reader, workers, listing):
        found.total += count
        if label is None:
            continue
        if categories and label not in categories.paths:
            continue
        found.labels.add(label)
        if stratify and last != (label, group):  # a product's pictures arrive together
            found.groups_by_label.setdefault(label, array("d")).append(unit_hash(group, seed))
            last = (label, group)
    return found


def _labels(reader: Reader, workers: Workers, listing: Listing) -> Iterator[tuple[str | None, str, int]]:
    """(label, group, items) from the reader's own cheap scan if it has one, else from its items; each
    also goes into the listing."""
    if hasattr(reader, "partitions"):
        scan_some = partial(scan_partitions, reader=reader)
        in_workers = _scan_in_workers(workers, reader.path.stat().st_size)
        for entry in ordered_map(scan_some, reader.partitions(), workers if in_workers else Workers(0), 4):
            listing.add_entries(*entry)
            yield entry
        return
    for item in reader:
        listing.add_item(item)
        yield (item.label, item.group, 1) if isinstance(item, Sample) else (None, "", 1)


def source_files(config: PackConfig, fmt: str) -> list[str | None]:
    """The files a plan reads besides the images: a CSV or dump, its --join CSV, --categories."""
    return [None if fmt == "folder" else config.source, config.csv.join, config.categories]


def executor(config: PackConfig) -> Any:
    """Where the batches run: worker processes here (parallel.Workers, --workers: the same for every backend,
    dali-gpu too, each process with its own DALI pipeline: shardtool/process/dali.py) or Ray tasks
    (ray_workers.RayWorkers)."""
    if config.distributor == "ray":
        from shardtool.ray_workers import RayWorkers

        return RayWorkers(config.ray_address)
    return Workers(config.workers)


def prepare_out(config: PackConfig, identity: dict[str, Any], listing: dict[str, Any]) -> Journal:
    """Refuse an OUT that holds something else, or a run over a source that has changed since; clear it
    on --overwrite; resume a matching run (same options, same listing: listing.py)."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT {out} is a file; pass a folder")
    out.mkdir(parents=True, exist_ok=True)
    ours = [p for p in out.iterdir() if _OURS.fullmatch(p.name)]
    foreign = [p for p in out.iterdir() if not _OURS.fullmatch(p.name)]
    journal = Journal(out)
    previous = journal.identity() or {}
    before = previous.pop("listing", None)
    if ours and (config.overwrite or previous != identity or before != listing):
        if not config.overwrite:
            raise ConfigError(_refusal(out, previous == identity, before, listing))
        for path in ours:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        journal = Journal(out)
    if foreign and not ours:
        raise ConfigError(f"OUT {out} is not empty and is not a shardtool output ({foreign[0].name}, ...); "
                          "choose an empty or new folder")
    journal.start(identity | {"listing": listing})
    return journal


def _refusal(out: Path, same_options: bool, before: dict[str, Any] | None, now: dict[str, Any]) -> str:
    if not same_options or before is None:
        return (f"OUT {out} already holds a different dataset (other source or options); "
                "pass --overwrite to replace it, or choose another OUT")
    change = (f"{before['inputs']:,} inputs then, {now['inputs']:,} now" if before["inputs"] != now["inputs"]
              else "files added, removed, renamed or modified")
    return (f"SOURCE changed since OUT {out} was packed from it ({change}): resuming would pack some images "
            "twice and miss others; pass --overwrite to pack it anew, or choose another OUT")


def pack(config: PackConfig, progress: Callable[[Progress], None] | None = None) -> dict[str, Any]:
    """Pack config.source into shards in config.out; returns the manifest (also written as dataset.json)."""
    check_not_starting_worker()
    config.validate()
    fmt, reader = open_reader(config)
    categories = read_categories(config.categories, config.csv.encoding) if config.categories else None
    encode = config.encode if config.encode != "auto" else ("png" if fmt == "pixels" else "jpg")
    backend = dali.choose_backend(config.backend)  # "pil", "dali-cpu" or "dali-gpu"
    identity = {**config.identity(), "format": fmt, "encode": encode, "backend": backend, "pillow": PIL.__version__,
                "shardtool": __version__} | ({"dali": dali.version()} if backend != "pil" else {})
    if not reader.labelled and (config.split or config.stratify):
        raise ConfigError(f"{config.source} has no labels: its samples all go to the split 'unlabelled'; "
                          "drop --split/--stratify")
    if reader.given_splits and config.split:
        raise ConfigError(f"{config.source} already has splits ({fmt} layout); drop --split to keep them")
    publisher = Publisher(config.publish) if config.publish else None  # OUT is a URL (publish.py)
    if publisher is not None:
        publisher.prepare()
    with executor(config) as workers:  # one pool for the scan and the encoding
        listing = Listing(*source_files(config, fmt))
        found = scan(reader, categories, config.seed, config.stratify and not reader.given_splits, workers, listing)
        if not found.labels and reader.labelled:
            raise ConfigError(f"{config.source} holds no labelled images")
        classes = class_entries(found.labels, reader.label_sep, categories)
        tree = hierarchy(classes, categories)
        journal = prepare_out(config, identity, found.listing.identity())
        splitter = None if reader.given_splits else Splitter(config.split, config.seed, found.groups_by_label or None)
        threads = dali.threads_per_process(workers.count)  # DALI's, in each process that runs batches
        spec = OutputSpec(config.resize, encode, config.quality, config.max_pixels, config.verify, backend, threads)
        index: dict[str | None, int | None] = {entry["name"]: entry["index"] for entry in classes} | {None: None}
        spool = str(journal.spool()) if config.distributor == "local" else None  # Ray: through its object store
        encode_items = partial(encode_batch, spec=spec, classes=index, spool=spool)
        runs = packed_runs(reader, categories, splitter, encode_items, journal.consumed(), workers, config)
        dedup = Dedup(config.dedup)
        dedup.restore(journal.records())  # what a resumed run's journal says was seen already
        write_shards(runs, config, journal, found.total, progress, publisher, dedup)
    source = {"path": config.source, "format": fmt} | ({"categories": config.categories} if categories else {})
    return finish(config, journal, classes, tree, source, identity, reader.ignored, publisher)


def write_shards(runs: Iterable[Run], config: PackConfig, journal: Journal, total: int,
                 progress: Callable[[Progress], None] | None, publisher: Publisher | None = None,
                 dedup: Dedup | None = None) -> None:
    """Each Run's stretches into the shards of their split, less what --dedup drops. Two threads work beside
    this loop: one writes and hashes the shards' bytes, the other fsyncs and journals finished shards."""
    done = journal.consumed()
    sinks: dict[str, SplitSink] = {}
    counts = Progress(sum(done.values()), total, 0, 0)
    with Background(pending=SEALS) as seals, Background() as writes:  # (writes hands over to seals: exits first)
        for run in runs:
            if dedup is not None:
                dedup.check(run)
            data = memoryview(run.data)
            for split, stretch in run.stretches():
                if split not in sinks:
                    sinks[split] = SplitSink(Path(config.out), split, journal, config.shard_size,
                                             config.shard_bytes, writes, seals, publisher and publisher.shard)
                if isinstance(stretch, Skip):
                    sinks[split].skip(stretch)
                    counts.skipped += 1
                else:
                    sinks[split].add(stretch, data)
                    counts.written += len(stretch)
            counts.done += len(run.entries)
            if progress:
                progress(counts)
        for sink in sinks.values():
            sink.close()


def packed_runs(reader: Reader, categories: Categories | None, splitter: Splitter | None,
                encode_items: Callable[[list[Item]], list[Run]], done: dict[str, int],
                workers: Workers, config: PackConfig) -> Iterator[Run]:
    """Runs of encoded Samples and Skips in the pack order (order.py), each with its split, minus what
    `done` (a resumed run's journal) accounts for; with drop-leaks train's first (dedup.phases)."""
    if hasattr(reader, "partitions"):  # one big file (a BSON dump): the workers read their own byte ranges
        for phase in phases(config.dedup):
            yield from _partition_runs(reader, categories, splitter, encode_items, done, workers, config, phase)
        return
    items = known_categories(reader, categories)  # Sample | Skip, in the source's order, nothing decoded
    items = ordered(items, config.order, config.seed)  # ... in the pack order
    items = assign_splits(items, splitter)        # ... each with its split
    passes = phases(config.dedup)
    plan = list(items) if len(passes) > 1 else items  # (listed once for both phases: no input is read twice)
    for phase in passes:
        some = skip_done((item for item in plan if in_phase(item, phase)), done)  # ... minus a resumed run's
        yield from ordered_map(encode_items, some, workers)  # Runs of encoded Sample | Skip


def _partition_runs(reader: Reader, categories: Categories | None, splitter: Splitter | None,
                    encode_items: Callable[[list[Item]], list[Run]], done: dict[str, int],
                    workers: Workers, config: PackConfig, phase: str | None) -> Iterator[Run]:
    """A partitioned source's Runs of one phase: a few permuted byte ranges per worker task, their products
    mixed; a resumed run's finished items are read and checked again, then dropped here."""
    mix = config.order == "shuffled"
    read = partial(read_and_encode, reader=reader, categories=categories, splitter=splitter,
                   encode_items=encode_items, mix_seed=config.seed if mix else None, phase=phase)
    resumed = Resumed(done)
    spans = ordered_partitions(reader.partitions(), config.order, config.seed)  # type: ignore[attr-defined]
    for run in ordered_map(read, spans, workers, batch=MIX_PARTITIONS if mix else 1):
        if resumed.left:  # a resumed run's finished shards: checked again, not written
            run.entries = [entry for entry in run.entries if resumed.keep(entry)]
        yield run


def encode_batch(items: list[Item], spec: OutputSpec, classes: dict[str | None, int | None], spool: str) -> list[Run]:
    """In a worker: read and hash each input, check and encode each image, then build the tar members (the
    writer only appends)."""
    process_batch = pil.process_batch if spec.backend == "pil" else dali.process_batch
    loaded, digests = read_inputs(items, spec.max_pixels)
    return [encode_run(process_batch(loaded, spec), classes, spool, digests)]


def read_and_encode(spans: list[tuple[int, int]], reader: Any, categories: Categories | None,
                    splitter: Splitter | None, encode_items: Callable[[list[Item]], list[Run]],
                    mix_seed: int | None = None, phase: str | None = None) -> list[Run]:
    """In a worker: the items of some byte ranges of the source, with their splits, checked and encoded;
    with MIX_SEED, the products of all the ranges in a seeded random order (order.py); with PHASE, only
    that phase's splits (dedup.phases)."""
    items: Iterable[Item] = itertools.chain.from_iterable(reader.read(span, splitter) for span in spans)
    if mix_seed is not None:
        items = permute_groups(items, order_rng(mix_seed, spans[0][0]))
    items = assign_splits(known_categories(items, categories), splitter)  # (splits of Skips)
    return encode_items([item for item in items if in_phase(item, phase)])


def scan_partitions(spans: list[tuple[int, int]], reader: Any) -> list[tuple[str | None, str, int]]:
    """In a worker: (label, group, items) of each document in some byte ranges of the source."""
    return [entry for span in spans for entry in reader.scan(span)]


def _scan_in_workers(workers: Workers, source_bytes: int) -> bool:
    """The first pass returns a few bytes per document, far less than it reads, so it runs in the
    workers when there are any; but auto keeps a dump under PARALLEL_SCAN_BYTES in this process, where
    starting the workers would cost about what they save."""
    if workers.auto:
        return workers.count > 1 and source_bytes >= PARALLEL_SCAN_BYTES
    return workers.count > 0


def finish(config: PackConfig, journal: Journal, classes: list[dict[str, Any]], tree: dict[str, Any] | None,
           source: dict[str, Any], options: dict[str, Any], ignored: list[dict[str, str]],
           publisher: Publisher | None = None) -> dict[str, Any]:
    """rejects.jsonl, the skip ceiling, duplicates.json and the other tools' sidecars, then dataset.json last
    (here, then at the OUT URL when there is one)."""
    out = Path(config.out)
    with open(out / "rejects.jsonl.tmp", "w", encoding="utf-8") as file:
        for record in journal.records():
            for skip in record["skips"]:
                file.write(json.dumps({"split": record["split"], **skip}, ensure_ascii=False) + "\n")
    (out / "rejects.jsonl.tmp").replace(out / "rejects.jsonl")
    manifest = build_manifest(journal.records(), classes, source, options, ignored, __version__)
    if tree:
        manifest = {**manifest, "hierarchy": tree}
    for stale in out.glob("*.tmp"):  # also when the ceiling below stops the run
        stale.unlink()
    check_ceiling(manifest["report"], config.max_skip_fraction, out)
    manifest["report"]["duplicates"], groups = find_duplicates(journal.records)
    journal.drop_spool()
    write_duplicates(out, groups)
    sidecars = write_sidecars(out, manifest)
    write_json_atomic(out / MANIFEST, manifest)
    if publisher is not None:
        for name in ["rejects.jsonl", DUPLICATES, *sidecars, MANIFEST]:
            publisher.put(out / name, keep=True)
    return manifest


def check_ceiling(report: dict[str, Any], fraction: float, out: Path) -> None:
    """More bad inputs than --max-skip-fraction stop the run (before the manifest). Pictures --dedup dropped
    are skips too (seen == written + skipped), but they were asked for: they do not count against it."""
    bad = report["skipped"] - sum(report["skips"].get(reason, {}).get("count", 0) for reason in DROPPED)
    if report["seen"] and bad > fraction * report["seen"]:
        top = ", ".join(f"{reason} {entry['count']}" for reason, entry in report["skips"].items()
                        if reason not in DROPPED)
        raise PackError(f"{bad} of {report['seen']} inputs were skipped ({top}), over "
                        f"--max-skip-fraction {fraction}: see {out / 'rejects.jsonl'}; "
                        "re-run with a higher --max-skip-fraction to accept (written shards are kept)")
