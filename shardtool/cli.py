"""The shardtool command line: parse options, delegate to the library, render with rich.

Its consoles and one_line_errors (a ShardtoolError shown as one line, no traceback) serve trainer/cli.py too."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from shardtool import __version__
from shardtool.config import (DEDUP_MODES, MAX_PIXELS, RANGES, CsvOptions, PackConfig, parse_resize, parse_shape,
                              parse_split)
from shardtool.errors import ShardtoolError
from shardtool.options import Bounded, Output, Range
from shardtool.readers.common import shown



err = Console(stderr=True, soft_wrap=True, highlight=False)  # one message, one line, even in CI logs
console = Console(soft_wrap=True, highlight=False)


def error(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(shown(message))}")  # no raw escape codes from a path


def one_line_errors(interrupted: str) -> type[click.Command]:
    """A click Command class: ShardtoolError -> `error: ...`, exit 2; Ctrl-C -> INTERRUPTED (how to resume), exit 130."""

    class Command(click.Command):
        def invoke(self, ctx: click.Context) -> Any:
            try:
                return super().invoke(ctx)
            except ShardtoolError as problem:
                error(str(problem))
                sys.exit(2)
            except KeyboardInterrupt:
                err.print(interrupted)
                sys.exit(130)

    return Command


Command = one_line_errors("interrupted: re-run the same command to resume")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="shardtool")
def main() -> None:
    """Pack image datasets into WebDataset shards with DALI indexes and a manifest."""


def _join_on(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    left, sep, right = value.partition("=")
    if not sep or not left or not right:
        raise click.BadParameter("use LEFT=RIGHT, e.g. product_id=id")
    return left, right


def _workers(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or not RANGES["workers"].admits(int(value)):
        raise click.BadParameter(f"use a number of processes from 0 to {RANGES['workers'].high:g}, or auto")
    return int(value)


@main.command(cls=Command)
@click.argument("source", type=click.Path())
@click.argument("out", type=Output(folder=True))
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "folder", "csv", "pixels", "bson"]), help="What SOURCE is.")
@click.option("--categories", type=click.Path(),
              help="CSV naming each label id and its category levels (Cdiscount's category_names.csv).")
@click.option("--images", type=click.Path(), help="CSV: folder the image column is relative to [CSV's folder].")
@click.option("--image-col", help="CSV: column holding the image path or id.")
@click.option("--image-suffix", default="", help="CSV: appended to the image column, e.g. .jpg.")
@click.option("--follow-links", is_flag=True,
              help="CSV: let image paths lead outside --images through symlinks (never through '..' or an "
                   "absolute path: those rows are skipped, outside_images).")
@click.option("--label-col", help="CSV: column holding the label (in SOURCE or the --join CSV).")
@click.option("--label-level", type=Bounded(RANGES["label_level"]),
              help="CSV: cut a 'A / B / C' label to its first N levels.")
@click.option("--join", type=click.Path(), help="CSV: second CSV to join for the label and metadata.")
@click.option("--join-on", callback=_join_on, help="CSV: LEFT=RIGHT join columns, e.g. product_id=id.")
@click.option("--group-col", help="CSV: samples sharing this column share a split [join key or image].")
@click.option("--split-col", help="CSV: column with a given split name per row.")
@click.option("--numeric-col", "numeric_cols", multiple=True, default=("price",), show_default=True,
              help="CSV: columns cleaned to numbers ('£1,250.00' -> 1250.0).")
@click.option("--encoding", default="utf-8-sig", show_default=True, help="CSV text encoding.")
@click.option("--shape", help="Pixel CSV: HxWxC when it cannot be inferred (784 -> 28x28x1, 3072 -> 32x32x3).")
@click.option("--channel-order", default="interleaved", show_default=True,
              type=click.Choice(["interleaved", "planar"]), help="Pixel CSV with 3 channels: RGBRGB.. or CIFAR's RR..GG..BB.")
@click.option("--resize", default="none", show_default=True,
              help="none | shorter:N | longer:N | fit:N (crop) | pad:N (black) | squash:N.")
@click.option("--encode", default="auto", show_default=True, type=click.Choice(["auto", "jpg", "png"]),
              help="Output encoding; auto: png for pixel CSVs, jpg otherwise.")
@click.option("--verify", default="full", show_default=True, type=click.Choice(["full", "header"]),
              help="full: decode every image; header: for inputs already in the output spec, parse the "
                   "header and end marker only and copy the bytes (trusted sources, faster).")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "dali", "pil"]),
              help="Decode/resize with DALI (on the GPU when CUDA is available) or PIL; auto: DALI on a GPU, "
                   "else the faster of the two on CPU (PIL, measured).")
@click.option("--quality", type=Bounded(RANGES["quality"]), default=90, show_default=True,
              help="JPEG quality when re-encoding.")
@click.option("--max-pixels", type=Bounded(RANGES["max_pixels"]), default=MAX_PIXELS, show_default=True,
              help="Skip images with more pixels (bombs).")
@click.option("--split", "split_text", default="", help="Held-out splits when SOURCE has none, e.g. val=0.1,test=0.1.")
@click.option("--stratify", is_flag=True, help="Give every class its share of each split.")
@click.option("--seed", type=Bounded(RANGES["seed"]), default=0, show_default=True,
              help="Seed of the split hash and of the shuffled order.")
@click.option("--order", default="shuffled", show_default=True, type=click.Choice(["shuffled", "source"]),
              help="shuffled: write each split in a seeded random order (a product's pictures kept together), "
                   "so every stretch of a shard is a fair sample; source: in the source's order.")
@click.option("--dedup", default="keep", show_default=True, type=click.Choice(DEDUP_MODES),
              help="Pictures with the same bytes (sha256) are always reported (OUT/duplicates.json). keep: write "
                   "them all; drop-within: keep the first (in the pack order) of each group within a split, skip "
                   "the rest (duplicate); drop-leaks: skip each picture of val, test or any other split whose bytes "
                   "train has (leak; train is packed first, never dropped from); drop-both: both. Dropped pictures "
                   "are skips that do not count against --max-skip-fraction.")
@click.option("--shard-size", type=Bounded(RANGES["shard_size"]), default=1000, show_default=True,
              help="Samples per shard, at most.")
@click.option("--shard-bytes", type=Bounded(RANGES["shard_bytes"]),
              help="Bytes per shard, at most (besides --shard-size).")
@click.option("--workers", default="auto", show_default=True, callback=_workers,
              help="Worker processes: N, 0 (in-process) or auto (one per core when the work pays for handing it over).")
@click.option("--distributor", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: --workers processes here | ray: Ray tasks on a cluster (byte-identical output).")
@click.option("--ray-address", help="Ray cluster to run on (ray://... or HOST:PORT) [RAY_ADDRESS, else a local one].")
@click.option("--staging", type=click.Path(), help="OUT a URL (s3://bucket/prefix, ...): local folder for the journal "
                                                   "and the shards on their way [~/.cache/shardtool/staging/...].")
@click.option("--max-skip-fraction", type=Bounded(RANGES["max_skip_fraction"]), default=0.01, show_default=True,
              help="Fail when more inputs than this are skipped (pictures --dedup drops aside).")
@click.option("--overwrite", is_flag=True, help="Replace a different dataset already in OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
def pack(source: str, out: str, fmt: str, categories: str | None, images: str | None, image_col: str | None,
         image_suffix: str, follow_links: bool, label_col: str | None, label_level: int | None, join: str | None, join_on: tuple[str, str] | None,
         group_col: str | None, split_col: str | None, numeric_cols: tuple[str, ...], encoding: str,
         shape: str | None, channel_order: str, resize: str, encode: str, verify: str, backend: str, quality: int,
         max_pixels: int,
         split_text: str, stratify: bool, seed: int, order: str, dedup: str, shard_size: int, shard_bytes: int | None,
         workers: int | None, distributor: str, ray_address: str | None, staging: str | None,
         max_skip_fraction: float, overwrite: bool, as_json: bool) -> None:
    """Pack SOURCE (class folders, a CSV manifest, a pixel CSV or a BSON dump) into shards in OUT, a folder or
    an fsspec URL (s3://bucket/prefix, gs://..., file://...)."""
    from shardtool.pack import pack as run_pack
    from shardtool.publish import default_staging, is_url

    publish = None
    if is_url(out):
        publish, out = out, staging or str(default_staging(out))

    csv = CsvOptions(image_col=image_col, label_col=label_col, images=images, image_suffix=image_suffix,
                     join=join, join_on=join_on, label_level=label_level, group_col=group_col,
                     split_col=split_col, numeric_cols=numeric_cols, encoding=encoding,
                     shape=parse_shape(shape) if shape else None, channel_order=channel_order,
                     follow_links=follow_links)
    config = PackConfig(source=source, out=out, format=fmt, csv=csv, categories=categories,
                        resize=parse_resize(resize), encode=encode, verify=verify, backend=backend,
                        quality=quality, max_pixels=max_pixels, split=parse_split(split_text), stratify=stratify,
                        seed=seed, order=order, dedup=dedup, shard_size=shard_size, shard_bytes=shard_bytes,
                        workers=workers, distributor=distributor, ray_address=ray_address, publish=publish,
                        max_skip_fraction=max_skip_fraction, overwrite=overwrite)
    columns = [TextColumn("packing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.speed} img/s"),
               TextColumn("written {task.fields[written]} skipped {task.fields[skipped]}"), TimeRemainingColumn()]
    with Progress(*columns, console=err, disable=as_json or not err.is_terminal) as bar:
        task = bar.add_task("pack", total=None, written=0, skipped=0)

        def update(p: Any) -> None:  # called once per batch of samples
            bar.update(task, completed=p.done, total=p.total, written=p.written, skipped=p.skipped)

        manifest = run_pack(config, update)
    if as_json:
        click.echo(json.dumps(manifest["report"] | {"splits": _split_summary(manifest)}, indent=1))
    else:
        render_pack(manifest, publish or out)


def _split_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    return {name: {k: s[k] for k in ("num_samples", "bytes")} | {"num_shards": len(s["shards"])}
            for name, s in manifest["splits"].items()}


@main.command(cls=Command)
@click.argument("out", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(out: str, as_json: bool) -> None:
    """Summarise the dataset in OUT: splits, classes, normalisation, skips."""
    from shardtool.manifest import load_manifest

    manifest = load_manifest(out)
    if as_json:
        click.echo(json.dumps(manifest.data, indent=1, ensure_ascii=False))
    else:
        render_inspect(manifest.data, out)


@main.command(cls=Command)
@click.argument("out", type=click.Path())
@click.option("--classes", "classes_file", type=click.Path(dir_okay=False),
              help="Plain tars: class names, one per line, line i naming label i [from .txt members, else the numbers].")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def index(out: str, classes_file: str | None, as_json: bool) -> None:
    """Write the indexes other tools read (timm _info.json, wids {split}.wids.json, classes.txt) into OUT.

    OUT packed by shardtool: rewritten from its dataset.json. OUT holding plain WebDataset tars written by
    another tool (in OUT or in train/, val/ ... folders): each tar is read once for a DALI .idx, and a
    dataset.json is written, so `trainer fit OUT` and every reader can use it.
    """
    from shardtool.index import index as run_index
    from shardtool.index import summary

    manifest = run_index(out, classes_file)
    if as_json:
        click.echo(json.dumps(manifest, indent=1, ensure_ascii=False))
    else:
        console.print(f"indexed {out}: {summary(manifest)}", markup=False)


@main.command(cls=Command)
@click.argument("out", type=click.Path())
@click.option("--decode", is_flag=True, help="Also decode every image in full.")
def verify(out: str, decode: bool) -> None:
    """Re-hash the shards of OUT (a folder or a URL: s3://..., fetched one shard at a time), check their .idx
    files and counts against the manifest."""
    from shardtool.verify import verify_dataset

    problems, checked = verify_dataset(out, decode=decode)
    for problem in problems:
        err.print(f"[red]FAIL[/red] {escape(problem)}")
    if problems:
        sys.exit(1)
    console.print(f"OK: {checked['shards']} shards, {checked['samples']} samples"
                  + (", every image decoded" if decode else ""))


@main.command(cls=Command)
@click.argument("data", type=click.Path())
@click.option("--out", "grid", default="grid.png", show_default=True, type=Output(), help="PNG to write.")
@click.option("--split", default=None, help="Split to sample from [train, or the first].")
@click.option("-n", "count", type=Bounded(Range(int, 1)), default=25, show_default=True, help="Number of images.")
@click.option("--seed", type=Bounded(RANGES["seed"]), default=0, show_default=True)
def show(data: str, grid: str, split: str | None, count: int, seed: int) -> None:
    """Write a contact sheet of random samples of DATA with their labels."""
    from shardtool.show import contact_sheet

    written = contact_sheet(data, grid, split=split, count=count, seed=seed)
    console.print(f"wrote {grid} ({written} images)", markup=False)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _splits_table(manifest: dict[str, Any]) -> Table:
    table = Table(title="splits")
    for column in ("split", "samples", "shards", "size"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, split in manifest["splits"].items():
        table.add_row(name, f"{split['num_samples']:,}", str(len(split["shards"])), _mb(split["bytes"]))
    return table


def _skips_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"skipped {report['skipped']:,} of {report['seen']:,} inputs")
    for column in ("reason", "count", "example"):
        table.add_column(column)
    for reason, entry in report["skips"].items():
        example = entry["examples"][0]
        table.add_row(reason, f"{entry['count']:,}", f"{example['source']}: {example['detail']}")
    return table


def _ignored_line(ignored: dict[str, Any]) -> str:
    paths: dict[str, list[str]] = {}
    for entry in ignored["examples"]:
        paths.setdefault(entry["reason"], []).append(entry["path"])
    reasons = "; ".join(f"{reason}: {', '.join(names)}" for reason, names in sorted(paths.items()))
    return f"ignored {ignored['count']} entries that are not samples ({reasons})"


def _duplicates_table(duplicates: dict[str, Any], out: str) -> Table:
    """Groups of pictures with the same bytes, within each split and across each pair of splits."""
    table = Table(title=f"{duplicates['groups']:,} groups of pictures with the same bytes ({duplicates['pictures']:,} "
                        f"pictures; every group in {escape(out)}/{duplicates['file']})")
    for column in ("where", "groups", "pictures", "of other groups", "left"):
        table.add_column(column, justify="left" if column == "where" else "right")
    for split, counts in duplicates["exact_within"].items():
        if counts["groups"]:
            table.add_row(f"within {escape(split)}", f"{counts['groups']:,}", f"{counts['copies']:,} extra copies",
                          f"{counts['other_groups']:,}", f"{counts['left']:,}")
    for pair, counts in duplicates["exact_across"].items():
        if counts["groups"]:
            second = escape(pair.split("/")[-1])
            table.add_row(f"across {escape(pair)}", f"{counts['groups']:,}", f"{counts['pictures']:,} in {second}",
                          f"{counts['other_groups']:,}", f"{counts['left']:,}")
    return table


def _duplicates_lines(duplicates: dict[str, Any] | None, out: str) -> list[Any]:
    if duplicates is None:  # a manifest from before duplicates were reported
        return []
    if not duplicates["groups"]:
        return [f"no two pictures have the same bytes ({duplicates['hash']})"]
    examples = "; ".join(" = ".join(escape(key) for key in group) for group in duplicates["examples"][:3])
    return [_duplicates_table(duplicates, out), f"e.g. {examples}"]


def render_pack(manifest: dict[str, Any], out: str) -> None:
    report = manifest["report"]
    console.print(_splits_table(manifest))
    if report["skips"]:
        console.print(_skips_table(report))
    for line in _duplicates_lines(report.get("duplicates"), out):
        console.print(line)
    if report["ignored"]["count"]:
        console.print(_ignored_line(report["ignored"]), markup=False)
    norm = manifest["normalization"]
    classes = f"{len(manifest['classes'])} classes" if manifest["classes"] else "no labels"
    stats = f"mean {norm['mean']} std {norm['std']}" if "mean" in norm else "no pixel statistics (--verify header)"
    console.print(f"{report['written']:,} samples in {classes} written to {out}; {stats}", markup=False)


def _classes_table(manifest: dict[str, Any]) -> Table:
    splits = list(manifest["splits"])
    table = Table(title=f"{len(manifest['classes'])} classes")
    table.add_column("index", justify="right")
    table.add_column("class")
    if any("levels" in entry for entry in manifest["classes"]):
        table.add_column("levels")
    for name in splits:
        table.add_column(name, justify="right")
    for entry in manifest["classes"]:
        counts = [f"{manifest['splits'][s]['class_counts'][entry['index']]:,}" for s in splits]
        levels = [" / ".join(entry.get("levels", []))] if len(table.columns) > 2 + len(splits) else []
        table.add_row(str(entry["index"]), escape(entry["name"]), *map(escape, levels), *counts)
    return table


def render_inspect(manifest: dict[str, Any], out: str) -> None:
    console.print(f"{manifest['created_by']} from {manifest['source']['path']} ({manifest['source']['format']})",
                  markup=False)
    console.print(_splits_table(manifest))
    if manifest["classes"]:
        console.print(_classes_table(manifest))
    else:
        console.print("no labels (an unlabelled source): samples keep their group, e.g. _id, for predictions")
    if manifest["report"]["skips"]:
        console.print(_skips_table(manifest["report"]))
    for line in _duplicates_lines(manifest["report"].get("duplicates"), out):
        console.print(line)
    norm = manifest["normalization"]
    console.print(f"normalisation from {', '.join(norm['from'])}: mean {norm.get('mean')} std {norm.get('std')}",
                  markup=False)
