"""trainer: streamed transfer learning from shardtool shards (fit, evaluate, predict, probe, export, serve).

Its modules sit in layers, each importing only from itself and the ones below (tests/test_layers.py):
runtime (errors, device, distributed, remote) -> data (dataset, data/) -> model (checkpoint, models/)
-> train (metrics, loop, config, probe) -> fit (run, fit) -> use (infer, predict, export, serve/) -> cli.
docs/code.md walks them.
"""

__version__ = "0.1.0"
