"""FitConfig: every option of `trainer fit`, from defaults <- a YAML file <- command-line flags.

The effective config is saved as OUT/config.yaml and inside every checkpoint; `--resume` reuses it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shardtool.cpus import usable_cpus
from shardtool.options import MAX_WORKERS, Range, check_device
from trainer.errors import ConfigError
from trainer.remote import Remote

# Options that decide which sample meets which weights: changing them breaks an exact resume.
RUN_IDENTITY = ("data", "model", "weights", "batch_size", "seed", "workers", "image_size", "train_split",
                "shuffle_buffer", "lr", "backbone_lr_mult", "optimizer", "freeze_epochs", "freeze_bn", "warmup_epochs",
                "unfreeze_warmup_epochs", "head_init", "ema_epochs",
                "mixup", "cutmix", "label_smoothing", "crop_scale", "weight_decay", "amp", "norm",
                "sampling", "mix", "epoch_size")
METRICS = ("val_top1", "val_top5", "val_loss", "val_balanced_acc")
# --weight-decay when not given, by optimizer: AdamW's is decoupled; SGD's is an L2 term in the gradient, and
# torchvision's ImageNet recipes use 1e-4 (AdamW's 0.05 as an L2 term would be 500x that)
WEIGHT_DECAY = {"adamw": 0.05, "sgd": 1e-4}
# The backbone's LR ramp after it unfreezes, by default: one epoch, and at least this many optimizer steps, so a
# small dataset (Fashion-MNIST's 702 images: 22 steps an epoch) does not reach the backbone's full LR in a few steps
BACKBONE_WARMUP_STEPS = 100
DEFAULT_WORKERS_CAP = 16  # past ~16 a DataLoader's forked workers cost memory more than they add speed


def default_workers() -> int:
    """Decode workers per training process when --workers is not given: the CPUs this process may use
    (affinity mask and CFS quota: shardtool.cpus) shared among this machine's training processes
    (torchrun's LOCAL_WORLD_SIZE), at least 1 and at most DEFAULT_WORKERS_CAP."""
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(DEFAULT_WORKERS_CAP, usable_cpus() // processes))


IMAGE_SIDE = Range(int, 32, 4096, zero=True)  # 0: the model's own; below 32 px a backbone's strides leave nothing
EPOCHS = Range(float, 0)  # warmups and time constants, in epochs
FRACTION = Range(float, 0, 1)
SEED = Range(int, 0, 2**63 - 1)
# What each numeric option of `trainer fit` may be (evaluate, predict and probe share theirs): the click type
# of its flag and FitConfig.validate() (a YAML file, --resume, Python) both read this table
RANGES = {
    "epochs": Range(int, 1), "batch_size": Range(int, 1, zero=True), "image_size": IMAGE_SIDE, "eval_image_size": IMAGE_SIDE,
    "lr": Range(float, 0, low_open=True), "backbone_lr_mult": Range(float, 0), "weight_decay": Range(float, 0),
    "momentum": Range(float, 0, 1, high_open=True), "warmup_epochs": EPOCHS, "min_lr": FRACTION,
    "freeze_epochs": Range(int, 0), "unfreeze_warmup_epochs": EPOCHS,
    "label_smoothing": Range(float, 0, 1, high_open=True), "ema_epochs": EPOCHS,
    "crop_scale": Range(float, 0, 1, low_open=True), "mixup": Range(float, 0), "cutmix": Range(float, 0),
    "workers": Range(int, 0, MAX_WORKERS), "shuffle_buffer": Range(int, 0), "patience": Range(int, 0),
    "checkpoint_every": Range(int, 0), "seed": SEED, "timeout": Range(float, 0, low_open=True),
    "retries": Range(int, 0), "cache_size": Range(float, 0), "epoch_size": Range(int, 0),
}
EVAL_BATCH = Range(int, 1)  # evaluate, predict, probe, export: a batch size, no auto
MIX_SHARE = Range(float, 0, low_open=True)


@dataclass(frozen=True)
class FitConfig:
    data: str | list[str]  # several: mixed (--mix), one class list between them
    out: str
    model: str = "efficientnet_lite0"
    weights: str = "imagenet"  # imagenet | none | PATH to a state dict
    epochs: int = 9  # the README recipe's, chosen on all three datasets of benchmarks/accuracy.py
    batch_size: int = 0  # per process; 0: from the device (device.default_batch_size)
    image_size: int = 0  # 0: the model's own input size
    eval_image_size: int = 0  # side for val/test/predict; 0: image_size (FixRes: a bit above it often scores higher)
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3  # the head's peak LR; the backbone gets lr * backbone_lr_mult
    backbone_lr_mult: float = 0.1
    weight_decay: float | None = None  # None: WEIGHT_DECAY[optimizer], set on creation (config.yaml has the number)
    momentum: float = 0.9
    warmup_epochs: float = 0.5
    min_lr: float = 0.01  # cosine floor, as a fraction of lr
    head_init: str = "auto"  # probe: the linear probe's head (LP-FT) | random | auto: probe with pretrained weights
    freeze_epochs: int = 0  # epochs training the head only, backbone frozen (BN in eval)
    unfreeze_warmup_epochs: float | None = None  # the backbone's LR ramp after unfreezing; None: 1 epoch, >= 100 steps
    freeze_bn: bool = True  # keep the pretrained BN running statistics for the whole run (not with weights none)
    label_smoothing: float = 0.1
    ema_epochs: float = 1.0  # time constant of an exponential moving average of the weights, in epochs; 0: off
    crop_scale: float = 0.3  # RandomResizedCrop's smallest area fraction (ImageNet training uses 0.08)
    mixup: float = 0.0  # alpha; 0 is off
    cutmix: float = 0.0
    amp: str = "auto"  # auto | bf16 | fp16 | none
    channels_last: bool = True
    compile: bool = False
    loader: str = "auto"  # auto | torch | dali
    workers: int = field(default_factory=default_workers)  # from the CPUs this process may use
    shuffle_buffer: int = 1000
    train_split: str = "train"
    val_split: str = "val"
    metric: str = "val_top1"  # what best.pt is chosen by
    patience: int = 0  # early stopping: epochs without improvement; 0 is off
    checkpoint_every: int = 200  # optimizer steps between mid-epoch last.pt; 0: at epoch ends only
    save_epochs: bool = False  # also keep every epoch's validated weights as OUT/epoch-N.pt
    on_corrupt: str = "fail"  # fail | skip
    norm: str = "model"  # model: the backbone's mean/std | dataset: the manifest's
    device: str = "auto"
    seed: int = 0
    sampling: str = "uniform"  # uniform | balanced | sqrt | weights:FILE (trainer/data/sampling.py)
    mix: str = ""  # several DATA: their shares of an epoch's draws, "0.7,0.3"; "": one pool
    epoch_size: int = 0  # draws per epoch, all ranks together; 0: the train split's size
    log_keys: bool = False  # audit: OUT/keys/rank-R.tsv lists every training batch's sample keys
    timeout: float = 30.0  # URL DATA: seconds without a byte before a request is retried
    retries: int = 5  # URL DATA: failed requests in a row (no progress) before the run stops
    cache: str = ""  # URL DATA: keep whole shards in this folder, checked against the manifest's sha256
    cache_size: float = 0.0  # GB the cache may hold (least recently used shards go); 0: no cap

    def __post_init__(self) -> None:
        if self.weight_decay is None and self.optimizer in WEIGHT_DECAY:
            object.__setattr__(self, "weight_decay", WEIGHT_DECAY[self.optimizer])

    @property
    def sources(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data)

    @property
    def proportions(self) -> list[float] | None:
        """--mix as shares summing to 1, by DATA; None without it (the DATA are one pool)."""
        if not self.mix:
            return None
        if not isinstance(self.mix, str):
            raise ConfigError(f"--mix {self.mix!r}: give the shares as one text, as 0.7,0.3")
        shares = [_number(text) for text in self.mix.split(",")]
        if not all(MIX_SHARE.admits(share) for share in shares):
            raise ConfigError(f"--mix {self.mix!r}: each share must be {MIX_SHARE.describe()}, as 0.7,0.3")
        if len(self.sources) == 1:
            raise ConfigError("--mix gives several DATA their shares (DATA1 DATA2 OUT --mix 0.7,0.3); one DATA "
                              "needs none")
        if len(shares) != len(self.sources):
            raise ConfigError(f"--mix gives {len(shares)} shares for {len(self.sources)} DATA: one per DATA, in order "
                              "(DATA1 DATA2 OUT --mix 0.7,0.3)")
        return [share / sum(shares) for share in shares]

    @property
    def remote(self) -> Remote:
        return Remote(timeout=self.timeout, retries=self.retries, cache=self.cache, cache_gb=self.cache_size)

    def validate(self) -> FitConfig:
        choices = {"optimizer": ("adamw", "sgd"), "amp": ("auto", "bf16", "fp16", "none"),
                   "loader": ("auto", "torch", "dali"), "metric": METRICS, "on_corrupt": ("fail", "skip"),
                   "norm": ("model", "dataset"), "head_init": ("auto", "probe", "random")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for name, range_ in RANGES.items():
            range_.check("--" + name.replace("_", "-"), getattr(self, name))
        check_device("--device", self.device)
        if not self.sources or not all(isinstance(source, str) and source for source in self.sources):
            raise ConfigError("DATA must be one or more shardtool outputs, URLs or shard patterns")
        from trainer.data.sampling import parse_sampling  # torch comes with trainer.data: not at `trainer --help`

        parse_sampling(self.sampling)
        self.proportions  # noqa: B018 - checks --mix
        if self.head_init == "probe" and (self.weights == "none" or self.norm != "model"):
            raise ConfigError("--head-init probe needs pretrained --weights and --norm model (the probe's features)")
        return self

    @property
    def probe_head(self) -> bool:
        """Whether the head starts as the linear probe's (auto: with pretrained weights and their norm)."""
        if self.head_init == "auto":
            return self.weights != "none" and self.norm == "model"
        return self.head_init == "probe"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def read_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of option: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in fields(FitConfig)}
    if unknown := sorted(set(data) - known):
        raise ConfigError(f"{path}: unknown option {unknown[0]!r} (options are the long flags of trainer fit)")
    return data


def build_config(given: dict[str, Any], yaml_path: str | None) -> FitConfig:
    """Defaults, then the YAML file, then the flags the user actually typed (GIVEN)."""
    merged = read_yaml(yaml_path) if yaml_path else {}
    merged.update(given)
    if "data" not in merged or "out" not in merged:
        raise ConfigError("give DATA and OUT (as arguments or in the config file)")
    try:
        return FitConfig(**merged).validate()
    except TypeError as error:
        raise ConfigError(f"bad config: {error}") from None


def resumed_config(saved: dict[str, Any], given: dict[str, Any]) -> FitConfig:
    """The checkpoint's config; flags may change epochs, patience and the like, not the run's identity."""
    changed = [k for k in RUN_IDENTITY if k in given and given[k] != saved.get(k)]
    if changed:
        raise ConfigError(f"--resume continues a run exactly; {changed[0]} differs from it "
                          f"({saved.get(changed[0])!r} vs {given[changed[0]]!r}): start a new OUT instead")
    known = {f.name for f in fields(FitConfig)}
    saved = {"ema_epochs": 0.0} | saved  # a run from before --ema-epochs had none
    return FitConfig(**{k: v for k, v in {**saved, **given}.items() if k in known}).validate()


def write_yaml(config: FitConfig, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
