"""A run of `trainer fit`, built and kept: its state, model, optimizer, loaders, moving average, checkpoints.

    FitConfig + manifest -> build_run -> Run (State, model, optimizer, train/val loaders, EMA)
    Run -> save (last.pt, best.pt, epoch-N.pt) ... load_checkpoint -> restore (--resume, exact)

trainer/fit.py runs the epochs on a Run (and starts its head from the probe); this module builds, saves and
restores it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trainer.checkpoint import check_classes, rng_state, save_checkpoint, set_rng_state
from trainer.config import FitConfig
from trainer.data import Loader, LoaderSpec, eval_spec, make_loader, spec_backend
from trainer.data.sampling import make_sampling, with_class_counts
from trainer.data.transforms import Preprocessing
from trainer.dataset import Dataset, Mixture, open_sources
from trainer.device import Amp, default_batch_size, make_amp, resolve_device
from trainer.distributed import Dist
from trainer.errors import ConfigError, TrainError
from trainer.keylog import KeyLog
from trainer.models import Model, create_model


@dataclass
class State:
    """Where the run is; saved in every checkpoint (plus model, optimizer, RNG)."""

    epoch: int = 0  # the epoch in progress, 0-based
    batch: int = 0  # batches of it already trained on
    step: int = 0  # optimizer steps so far
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    partial: dict[str, float] = field(default_factory=dict)  # this epoch's TrainSums so far
    schedule_epochs: int = 0  # the epochs the LR schedule was laid out for at the start (0: before this field)
    resolved: dict[str, Any] = field(default_factory=dict)  # what auto settings became: loader, device, amp, world
    start: dict[str, float] = field(default_factory=dict)  # LP-FT: the starting point's val metrics (epoch 0)


@dataclass
class Run:
    config: FitConfig
    dist: Dist
    dataset: Dataset | Mixture
    model: Model
    device: torch.device
    amp: Amp
    optimizer: torch.optim.Optimizer
    train: Loader
    val: Loader | None
    out: Path
    state: State = field(default_factory=State)
    keys: KeyLog | None = None
    probe: dict[str, float] = field(default_factory=dict)  # the probe's top-1 when the head started from it
    ema: AveragedModel | None = None  # --ema-epochs: what is validated, kept as best.pt and exported
    wrapped: tuple[bool, nn.Module] | None = None  # (frozen, DDP/compiled model) while the trainable set holds

    @property
    def kept(self) -> nn.Module:
        """The weights validated and saved as best.pt: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model.module


def preprocessing(config: FitConfig, dataset: Dataset | Mixture, model: Model) -> dict[str, Any]:
    """What the model sees: input size and the mean/std the loader normalises with (saved in checkpoints)."""
    mean, std = model.mean, model.std
    if config.norm == "dataset":
        norm = dataset.normalization
        if "mean" not in norm:
            raise ConfigError("--norm dataset: the manifest has no mean/std (packed with --verify header, or indexed "
                              "from plain tars): use --norm model")
        if norm.get("images") is not None and norm["images"] < norm["of"]:
            raise ConfigError(f"--norm dataset: the manifest's mean/std cover {norm['images']:,} of {norm['of']:,} "
                              f"images (--verify header copies the rest undecoded): use --norm model, or pack "
                              "with --verify full")
        mean, std = tuple(norm["mean"]), tuple(norm["std"])
    train_size = config.image_size or model.input_size
    return Preprocessing.at(config.eval_image_size or train_size, mean, std).saved(train_size)


def loader_spec(config: FitConfig, dataset: Dataset | Mixture, model: Model, dist: Dist, device: torch.device,
                split: str, train: bool) -> LoaderSpec:
    """Training draws as --sampling, --mix and --epoch-size say (trainer/data/sampling.py); eval reads every
    sample once, unweighted."""
    pre = preprocessing(config, dataset, model)
    batch_size = config.batch_size or default_batch_size(device, pre["train_image_size"])
    spec = eval_spec(dataset, split, Preprocessing.from_checkpoint(pre), batch_size, scale=(config.crop_scale, 1.0),
                     seed=config.seed, rank=dist.rank, world=dist.world, workers=config.workers,
                     shuffle_buffer=config.shuffle_buffer, on_corrupt=config.on_corrupt, device=str(device),
                     remote=config.remote)
    if not train:
        return spec
    shards = with_class_counts(spec.shards, config.sampling)
    sampling = make_sampling(config.sampling, shards, dataset.class_names, config.proportions, config.epoch_size)
    return replace(spec, shards=shards, train=True, image_size=pre["train_image_size"], sampling=sampling)


def make_optimizer(config: FitConfig, model: Model) -> torch.optim.Optimizer:
    """Four groups: backbone/head x decay/no-decay (biases and norm weights are not decayed)."""
    groups = []
    head = {id(p) for p in model.head.parameters()}
    for part, mult in (("backbone", config.backbone_lr_mult), ("head", 1.0)):
        params = [p for p in model.module.parameters() if (id(p) in head) == (part == "head")]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decay]
            if chosen:
                groups.append({"params": chosen, "lr_mult": mult, "weight_decay": config.weight_decay * decay,
                               "part": part})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def set_frozen(model: Model, frozen: bool, freeze_bn: bool = False) -> None:
    """Frozen: only the head learns. The backbone's BatchNorm keeps its running statistics while frozen,
    and for the whole run with FREEZE_BN (its affine weights still learn once unfrozen)."""
    for p in model.backbone_parameters():
        p.requires_grad_(not frozen)
    model.module.train()
    if frozen or freeze_bn:
        for module in model.module.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def build_run(config: FitConfig, dist: Dist, checkpoint: dict[str, Any] | None) -> Run:
    dataset = open_sources(config.sources, config.remote)
    if not dataset.classes:
        raise ConfigError(f"{dataset.root} has no labels (an unlabelled dump): nothing to train on")
    device = resolve_device(config.device, dist)
    if device.type == "cuda":  # every training batch has the same shape: cuDNN picks each layer's fastest kernel once
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(config.seed)
    model = create_model(config.model, len(dataset.classes), config.weights)
    if config.channels_last:
        model.module.to(memory_format=torch.channels_last)
    model.module.to(device)
    train = make_loader(loader_spec(config, dataset, model, dist, device, config.train_split, True), config.loader)
    if not train.num_batches:
        raise ConfigError(f"process {dist.rank} of {dist.world} gets no training samples: {config.train_split} has "
                          f"{dataset.num_samples(config.train_split):,} in {len(dataset.shards(config.train_split))} "
                          "shards; use fewer processes")
    val = None
    if dataset.has_split(config.val_split):
        val = make_loader(loader_spec(config, dataset, model, dist, device, config.val_split, False), config.loader)
    run = Run(config, dist, dataset, model, device, make_amp(config.amp, device), make_optimizer(config, model),
              train, val, Path(config.out))
    if config.ema_epochs:
        run.ema = make_ema(model.module, config.ema_epochs * train.num_batches)
    if checkpoint is not None:
        restore(run, checkpoint)
        check_resolved(run)
    else:
        run.state.schedule_epochs, run.state.resolved = config.epochs, resolved(run)
    return run


def resolved(run: Run) -> dict[str, Any]:
    """What the run's auto settings resolved to on this machine: a resume elsewhere must resolve the same."""
    train = loader_spec(run.config, run.dataset, run.model, run.dist, run.device, run.config.train_split, True)
    found = {"loader": spec_backend(train, run.config.loader), "device": run.device.type,
             "amp": str(run.amp.dtype).removeprefix("torch.") if run.amp.dtype else "none", "world": run.dist.world,
             "batch_size": train.batch_size}
    if train.sampling is not None:  # what the draws come from: a weights file edited since would change them
        found["sampling"] = train.sampling.fingerprint
    return found


def check_resolved(run: Run) -> None:
    """--resume on another machine or launch must not switch loader, device, precision or ranks mid-run."""
    then, now = run.state.resolved, resolved(run)
    changed = [f"{k} {then[k]} -> {now[k]}" for k in then if then[k] != now.get(k)]
    if changed:
        raise ConfigError(f"--resume continues a run exactly, and here {', '.join(changed)}: resume where it "
                          "ran (same loader, device, AMP, batch size, number of processes and sampling weights) or "
                          "start a new OUT")


def make_ema(module: nn.Module, steps: float) -> AveragedModel:
    """torch's AveragedModel with an EMA of time constant STEPS optimizer steps (decay exp(-1/STEPS) per
    step); buffers are averaged too. Its first update copies the weights after the first step."""
    return AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(math.exp(-1 / max(steps, 1))), use_buffers=True)


def restore(run: Run, checkpoint: dict[str, Any]) -> None:
    check_classes(checkpoint, run.dataset.class_names, run.dataset.root)
    run.model.module.load_state_dict(checkpoint["model"])
    if run.ema is not None:
        run.ema.load_state_dict(checkpoint["ema"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    if run.amp.scaler is not None and checkpoint.get("scaler"):
        run.amp.scaler.load_state_dict(checkpoint["scaler"])
    run.state = State(**checkpoint["state"])
    set_rng_state(checkpoint["rng"])


def save(run: Run, name: str) -> None:
    """last.pt: the training weights (and the average, to resume it); best.pt, epoch-N.pt: the kept weights."""
    if not run.dist.main:
        return
    weights = run.model.module if name == "last.pt" else run.kept
    check_finite(weights, name)
    state = {"model": weights.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scaler": run.amp.scaler.state_dict() if run.amp.scaler else {}, "state": asdict(run.state),
             "rng": rng_state(), "config": run.config.to_dict(), "classes": run.dataset.class_names,
             "class_entries": run.dataset.classes,
             "preprocessing": preprocessing(run.config, run.dataset, run.model)}
    if run.ema is not None and name == "last.pt":
        state["ema"] = run.ema.state_dict()
    save_checkpoint(state, run.out / name)


def check_finite(module: nn.Module, name: str) -> None:
    """Never write weights that hold nan or inf (a step with a finite loss can still make them: --lr 1e30)
    over a good checkpoint; one host sync per checkpoint, not per step."""
    floats = [tensor for tensor in module.state_dict().values() if tensor.is_floating_point()]
    if floats and not bool(torch.stack([torch.isfinite(tensor).all() for tensor in floats]).all()):
        raise TrainError(f"the weights hold nan or inf: {name} was not written (the one on disk keeps the last "
                         "finite weights); lower --lr")
