"""shardtool: pack image datasets into WebDataset shards with DALI indexes and one manifest."""

__version__ = "0.1.0"
