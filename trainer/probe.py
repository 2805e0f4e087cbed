"""trainer probe: the linear-probe baseline every fine-tune should beat, and a CPU's quick classifier.

    manifest -> model from the registry (frozen, eval) -> cached pooled features per split (features.py)
             -> softmax head, L2 chosen by val top-1 (linear.py) -> val/test top-1
             -> --save: backbone + that head as a checkpoint evaluate/predict load like fit's

The feature cache lives in --out (default DATA/.probe/MODEL) and is reused while the model, weights,
seed, preprocessing, amp, loader and every shard's sha256 stay the same.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shardtool.hashing import file_sha256
from shardtool.options import check_device, check_output_file, check_output_folder
from trainer.checkpoint import save_checkpoint
from trainer.config import EVAL_BATCH, RANGES, default_workers
from trainer.data import LoaderSpec, eval_spec, resolve_backend
from trainer.dataset import Dataset, is_url, open_dataset
from trainer.errors import ConfigError
from trainer.features import CACHE_VERSION, Progress, SplitFeatures, extract_all, load_cached
from trainer.data.transforms import Preprocessing
from trainer.device import Amp, make_amp, resolve_device
from trainer.linear import Choice, Rows, choose_head, score
from trainer.metrics import new_meter_for
from trainer.models import Model, create_model


@dataclass(frozen=True)
class ProbeConfig:
    data: str
    out: str = ""  # feature cache folder; "": DATA/.probe/MODEL
    save: str = ""  # checkpoint path for backbone + head; "": not saved
    model: str = "efficientnet_lite0"
    weights: str = "imagenet"  # imagenet | none | PATH to a state dict
    image_size: int = 0  # side of the centre crop (shorter side resized to side/0.875); 0: the model's own
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    loader: str = "auto"  # auto | torch | dali
    amp: str = "auto"  # auto | bf16 | fp16 | none
    device: str = "auto"
    seed: int = 0  # initialises a random-init backbone (tiny_cnn, --weights none)
    train_split: str = "train"
    val_split: str = "val"
    on_corrupt: str = "fail"  # the only policy: a cache must hold every sample (evaluate reads it from here)

    def validate(self) -> ProbeConfig:
        choices = {"loader": ("auto", "torch", "dali"), "amp": ("auto", "bf16", "fp16", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for name in ("image_size", "workers", "seed"):
            RANGES[name].check("--" + name.replace("_", "-"), getattr(self, name))
        EVAL_BATCH.check("--batch-size", self.batch_size)
        check_device("--device", self.device)
        check_output_folder("--out", self.out)  # both before any feature is extracted
        check_output_file("--save", self.save)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Extracted:
    """What the head is fitted on: each role's cached features, and where they came from."""

    dataset: Dataset
    roles: dict[str, str]  # role (train, val, test) -> split name
    model: Model
    preprocessing: Preprocessing
    folder: Path
    features: dict[str, SplitFeatures]  # by role; rows in the eval loader's batch order, labels beside them
    cached: bool  # reused from FOLDER, not extracted


def extract(config: ProbeConfig, progress: Progress = lambda role, done, total: None) -> Extracted:
    """CONFIG's features, from the cache when its key matches, else extracted by the frozen backbone."""
    dataset = open_dataset(config.data)
    roles = split_roles(config, dataset)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = create_model(config.model, len(dataset.classes), config.weights)
    model.module.to(device).to(memory_format=torch.channels_last).eval()
    amp, pre = make_amp(config.amp, device), preprocessing(model, config.image_size)
    backend = resolve_backend(config.loader, str(device))
    folder = cache_folder(config, dataset)
    specs = {role: eval_spec(dataset, split, pre, config.batch_size, workers=config.workers, on_corrupt="fail",
                             device=str(device)) for role, split in roles.items()}
    key = cache_key(config, dataset, roles, specs, amp, backend)
    features = load_cached(folder, key)
    cached = features is not None
    if features is None:
        features = extract_all(model, specs, backend, amp, folder, key, progress)
    return Extracted(dataset, roles, model, pre, folder, features, cached)


def probe(config: ProbeConfig, progress: Progress = lambda role, done, total: None) -> dict[str, Any]:
    """Features (cached or extracted), the chosen head, its top-1 per split; saves it with CONFIG.save."""
    start = time.perf_counter()
    found = extract(config, progress)
    dataset, features = found.dataset, found.features
    extracted = time.perf_counter()
    choice = choose_head(features["train"], features.get("val"), len(dataset.classes),
                         lambda: new_meter_for(dataset, torch.device("cpu")))
    results = {role: score(choice.head, Rows(split), new_meter_for(dataset, torch.device("cpu")))
               for role, split in features.items()}
    summary = report(config, found.roles, found.folder, found.cached, features, choice, results)
    summary["seconds"] = {"features": extracted - start, "head": time.perf_counter() - extracted}
    if config.save:
        save_probe(config, dataset, found.model, choice, found.preprocessing, summary)
    summary["seconds"]["total"] = time.perf_counter() - start
    return summary


def split_roles(config: ProbeConfig, dataset: Dataset) -> dict[str, str]:
    """role (train, val, test) -> the manifest's split name; val and test only when the data has them."""
    if not dataset.classes:
        raise ConfigError(f"{config.data} has no labels (an unlabelled dump): nothing to probe")
    roles = {"train": dataset.split_name(config.train_split)}  # a missing train split is a one-line error
    if not dataset.labelled(roles["train"]):
        raise ConfigError(f"split {roles['train']!r} is unlabelled: pick a labelled one with --train-split")
    if dataset.has_split(config.val_split) and dataset.labelled(config.val_split):
        roles["val"] = dataset.split_name(config.val_split)
    if dataset.has_split("test") and dataset.split_name("test") not in roles.values():
        roles["test"] = dataset.split_name("test")
    return roles


def preprocessing(model: Model, image_size: int) -> Preprocessing:
    """The checkpoint's preprocessing, as fit writes it: every split gets the eval transform at one size."""
    return Preprocessing.at(image_size or model.input_size, model.mean, model.std)


def cache_folder(config: ProbeConfig, dataset: Dataset) -> Path:
    if config.out:
        return Path(config.out)
    if is_url(dataset.root):
        raise ConfigError(f"{config.data} is remote: give --out, a local folder for the feature cache")
    return Path(dataset.root) / ".probe" / config.model.replace("/", "_").replace(":", "_")


def cache_key(config: ProbeConfig, dataset: Dataset, roles: dict[str, str], specs: dict[str, LoaderSpec],
              amp: Amp, backend: str) -> dict[str, Any]:
    """Everything the cached features depend on; any change recomputes them."""
    spec = specs["train"]
    hashes = {role: {"split": split, "sha256": [shard.sha256 for shard in specs[role].shards]}
              for role, split in roles.items()}
    return {"version": CACHE_VERSION, "model": config.model, "weights": weights_id(config.weights),
            "seed": config.seed, "preprocessing": {"resize_shorter": spec.eval_resize, "centre_crop": spec.image_size,
                                                   "mean": list(spec.mean), "std": list(spec.std)},
            "amp": str(amp.dtype), "loader": backend, "splits": hashes}


def weights_id(weights: str) -> str:
    """imagenet | none as they are; a state-dict file by its sha256 (a path may be overwritten)."""
    if weights in ("imagenet", "none") or not Path(weights).is_file():
        return weights
    return f"sha256:{file_sha256(weights)}"


def report(config: ProbeConfig, roles: dict[str, str], folder: Path, cached: bool,
           features: dict[str, SplitFeatures], choice: Choice, results: dict[str, Any]) -> dict[str, Any]:
    return {"model": config.model, "data": config.data, "splits": roles, "cache": str(folder), "cached": cached,
            "feature_dim": int(features["train"].features.shape[1]),
            "l2": choice.l2, "grid": choice.grid, **results, "saved": config.save or None}


def save_probe(config: ProbeConfig, dataset: Dataset, model: Model, choice: Choice, pre: Preprocessing,
               summary: dict[str, Any]) -> None:
    """The backbone with the probe's head, in fit's checkpoint format (config: the probe's)."""
    with torch.no_grad():
        model.head.weight.copy_(choice.head.weight)
        model.head.bias.copy_(choice.head.bias)
    state = {"model": {k: v.cpu() for k, v in model.module.state_dict().items()}, "config": config.to_dict(),
             "classes": dataset.class_names, "class_entries": dataset.classes, "preprocessing": pre.saved(),
             "probe": {k: summary[k] for k in ("l2", "grid", "splits")} |
                      {role: summary[role]["top1"] for role in ("val", "test") if role in summary}}
    path = Path(config.save)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, path)


def fit_probe(fit_config: Any, out: Path, progress: Progress = lambda role, done, total: None) -> dict[str, Any]:
    """The probe `trainer fit` starts its head from (LP-FT): FIT_CONFIG's model, weights, data and eval
    size (of several DATA: the first's); the feature cache and the head (probe.pt) in OUT."""
    config = ProbeConfig(data=fit_config.sources[0], out=str(out), save=str(out / "probe.pt"), model=fit_config.model,
                         weights=fit_config.weights,
                         image_size=fit_config.eval_image_size or fit_config.image_size,
                         workers=fit_config.workers, loader=fit_config.loader, amp=fit_config.amp,
                         device=fit_config.device, seed=fit_config.seed, train_split=fit_config.train_split,
                         val_split=fit_config.val_split)
    out.mkdir(parents=True, exist_ok=True)  # probe.pt's folder: a --save whose folder is missing is refused
    return probe(config.validate(), progress)
