"""Loaders: shards -> Batch on the device. Two backends, one contract.

Every backend takes a LoaderSpec and yields `Batch` objects whose images are already on the device,
float, normalised with the spec's mean/std and channels_last, so the loop never knows which one ran:

    shards (manifest) -> plan (which samples, in which order, on this rank) -> backend -> Batch
"""

from __future__ import annotations

from pathlib import Path

from trainer.data.spec import Batch, Loader, LoaderSpec, check_label, eval_spec
from trainer.dataset import Shard, is_url
from trainer.errors import ConfigError

__all__ = ["Batch", "Loader", "LoaderSpec", "check_label", "eval_spec", "make_loader", "resolve_backend",
           "spec_backend"]


def make_loader(spec: LoaderSpec, backend: str) -> Loader:
    """backend: torch | dali | auto (dali when it is installed and a GPU is there, else torch)."""
    if spec_backend(spec, backend) == "dali":
        if not dali_available():  # only --loader dali gets here without DALI: auto chose torch
            raise ConfigError("--loader dali needs NVIDIA DALI, which is not installed here: pip install "
                              "'shardtool[dali]' (or the DALI wheel for this machine's CUDA), or use --loader torch")
        from trainer.data.dali import DaliLoader

        if not has_json_members(spec.shards):  # tars written by another tool, indexed by `shardtool index`
            if backend == "dali":
                raise ConfigError("--loader dali reads each sample's key from its .json member, and these shards "
                                  "have none (written by another tool): use --loader torch")
        else:
            return DaliLoader(spec)
    from trainer.data.torch import TorchLoader

    return TorchLoader(spec)


def resolve_backend(backend: str, device: str, torch_only: bool = False) -> str:
    """The backend make_loader runs for BACKEND (auto: dali on a GPU when installed, else torch; torch where
    only it can: URL shards without --cache, sampling)."""
    if backend == "auto":
        return "dali" if device.startswith("cuda") and dali_available() and not torch_only else "torch"
    return backend


def spec_backend(spec: LoaderSpec, backend: str) -> str:
    """The backend make_loader runs for SPEC: resolve_backend with what SPEC's shards and sampling allow."""
    return resolve_backend(backend, spec.device, uncached_urls(spec) or spec.sampling is not None)


def uncached_urls(spec: LoaderSpec) -> bool:
    """SPEC reads URL shards directly (no --cache): only the torch loader can."""
    return not spec.remote.cache and any(is_url(shard.url) for shard in spec.shards)


def has_json_members(shards: tuple[Shard, ...]) -> bool:
    """Whether samples carry a .json member, from the first line of the first local .idx (shards packed by
    shardtool always do; a URL's are assumed to)."""
    if not shards or not Path(shards[0].index_url).is_file():
        return True
    with open(shards[0].index_url, encoding="utf-8") as index:
        index.readline()
        return " json " in f" {index.readline()}"


def dali_available() -> bool:
    """Whether DALI can be imported (find_spec alone would not see a broken install)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True
