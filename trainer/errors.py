"""Errors a trainer user can see; the CLI prints each on one line (shared base with shardtool)."""

from shardtool.errors import ConfigError, ShardtoolError

__all__ = ["ConfigError", "TrainError"]


class TrainError(ShardtoolError):
    """Training could not go on: a corrupt shard under --on-corrupt fail, a checkpoint that does not fit, ..."""
