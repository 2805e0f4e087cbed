"""The trainer command line. Its commands (fit, evaluate, predict) arrive with the trainer issue;
until then `trainer` only reads a shardtool manifest, so the two packages share one format from day one."""

from __future__ import annotations

import click

from trainer import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trainer")
def main() -> None:
    """Train, evaluate and predict from shardtool shards (fit/evaluate/predict: not built yet)."""
