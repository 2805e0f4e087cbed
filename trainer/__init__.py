"""trainer: streamed transfer learning from shardtool shards (fit, evaluate, predict)."""

__version__ = "0.1.0"
