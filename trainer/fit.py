"""fit: the composition, top to bottom.

    manifest -> loaders (train, val) -> model from the registry, new head -> optimizer (head lr, backbone lr * mult)
    for each epoch: freeze or unfreeze -> train_one_epoch (mid-epoch last.pt) -> evaluate -> log -> best.pt/last.pt
    at the end: best.pt on the test split (when there is one) -> confusion matrix, summary.json
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from shardtool.options import check_device, check_output_folder
from trainer.checkpoint import check_classes, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainer.config import BACKBONE_WARMUP_STEPS, FitConfig, write_yaml
from trainer.data import Batch, Loader, LoaderSpec, make_loader, spec_backend
from trainer.data.sampling import make_sampling, with_class_counts
from trainer.dataset import Dataset, Mixture, open_sources
from trainer.distributed import Dist, all_sum, any_rank, barrier, from_main
from trainer.errors import ConfigError, TrainError
from trainer.infer import eval_resize
from trainer.keylog import KeyLog
from trainer.loop import Amp, Step, TrainSums, evaluate, train_one_epoch
from trainer.metrics import CLASS_COLUMNS, EvalMeter, RunLog, level_maps_from_manifest

write_confusion, write_summary = RunLog.write_confusion, RunLog.write_summary
from trainer.models import Model, create_model
from trainer.schedule import lr_at, ramp


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


def resolve_device(name: str, dist: Dist | None = None) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a device. Under torchrun (DIST with world > 1) a CUDA device is always
    cuda:LOCAL_RANK, one GPU per process, whatever index was asked for: NCCL fails with two ranks on one."""
    check_device("--device", name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device here (use cpu or auto)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    if name.startswith("cuda") and dist is not None and dist.world > 1:
        return torch.device("cuda", dist.local_rank)
    return torch.device(name)


BATCH_PER_GB = 8  # samples per GB of GPU memory at 224 px (EfficientNet-Lite0, bf16: not measured on a GPU yet)


def default_batch_size(device: torch.device, image_size: int) -> int:
    """--batch-size 0: 32 on a CPU; on a GPU BATCH_PER_GB per GB of its memory, scaled by (224 / side)^2, the
    power of 2 below that, from 32 to 512 (an 80 GB card: 512 at 224 px, 128 at 448; 24 GB: 128)."""
    if device.type != "cuda":
        return 32
    gigabytes = torch.cuda.get_device_properties(device).total_memory / 2**30
    fits = BATCH_PER_GB * gigabytes * (224 / image_size) ** 2
    return min(512, max(32, 2 ** int(math.log2(max(fits, 1)))))


def make_amp(mode: str, device: torch.device) -> Amp:
    """auto: bf16 on a GPU that has it (else fp16 with a scaler); bf16 on a CPU with native bf16 (4x here)."""
    if mode == "auto":
        if device.type == "cuda":  # native bf16 only (Ampere and later): V100/T4 emulate it, slowly
            mode = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        else:
            mode = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "none"
    if mode == "none":
        return Amp(None, device.type)
    if mode == "fp16":
        return Amp(torch.float16, device.type, torch.amp.GradScaler(device.type))
    return Amp(torch.bfloat16, device.type)


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
    size = config.eval_image_size or train_size
    return {"image_size": size, "train_image_size": train_size, "resize_shorter": eval_resize(size),
            "mean": list(mean), "std": list(std)}


def loader_spec(config: FitConfig, dataset: Dataset | Mixture, model: Model, dist: Dist, device: torch.device,
                split: str, train: bool) -> LoaderSpec:
    """Training draws as --sampling, --mix and --epoch-size say (trainer/data/sampling.py); eval reads every
    sample once, unweighted."""
    pre = preprocessing(config, dataset, model)
    size = pre["train_image_size" if train else "image_size"]
    batch_size = config.batch_size or default_batch_size(device, pre["train_image_size"])
    shards, sampling = tuple(dataset.shards(split)), None
    if train:
        shards = with_class_counts(shards, config.sampling)
        sampling = make_sampling(config.sampling, shards, dataset.class_names, config.proportions, config.epoch_size)
    return LoaderSpec(shards=shards, batch_size=batch_size, image_size=size,
                      resize_size=pre["resize_shorter"], mean=tuple(pre["mean"]), std=tuple(pre["std"]), train=train,
                      scale=(config.crop_scale, 1.0), labelled=dataset.labelled(split),
                      num_classes=len(dataset.classes), seed=config.seed, rank=dist.rank, world=dist.world,
                      workers=config.workers, shuffle_buffer=config.shuffle_buffer, on_corrupt=config.on_corrupt,
                      device=str(device), remote=config.remote, sampling=sampling)


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


def fit(config: FitConfig, dist: Dist = Dist(), resume: bool = False, overwrite: bool = False,
        progress: Callable[[int, Step], None] = lambda epoch, step: None,
        on_epoch: Callable[[dict[str, Any]], None] = lambda row: None) -> dict[str, Any]:
    """Train CONFIG's model on CONFIG's data; returns the summary also written to OUT/summary.json."""
    out = Path(config.out)
    check_output_folder("OUT", config.out)  # before the dataset is opened or a model built
    if not resume and not overwrite and (out / "last.pt").exists():
        raise ConfigError(f"{out} already holds a run: --resume to continue it, --overwrite to start again")
    checkpoint = load_checkpoint(out / "last.pt") if resume else None
    run = build_run(config, dist, checkpoint)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        write_yaml(config, out / "config.yaml")
    if checkpoint is None and config.probe_head:
        start_from_probe(run)
    log = RunLog(out, resume_epoch=run.state.epoch if resume else None) if dist.main else None
    if config.log_keys:
        run.keys = KeyLog(out, dist.rank, run.state.step if resume else None)
    try:
        while run.state.epoch < config.epochs and not stop_early(run):
            row = run_epoch(run, progress)
            on_epoch(row)
            if log is not None:
                log.log_epoch(row)
        return finish(run, progress)
    finally:
        if log is not None:
            log.close()
        if run.keys is not None:
            run.keys.close()


def start_from_probe(run: Run) -> None:
    """LP-FT (Kumar et al., 2022, "Fine-Tuning can Distort Pretrained Features"): the head starts as the
    linear probe's, fitted in seconds on the frozen backbone's cached features, so the backbone's first
    gradients come through a good head, not a random one. Rank 0 runs the probe into OUT/probe.

    The starting point is epoch 0 of best.pt's choice, validated through the same model, precision and
    loader as every epoch after it (the probe's own figure, from cached features and a float32 head, can
    differ by an image or two): an epoch replaces it only by beating it, so a fine-tune that does not help
    hands back the probe (summary.json best_epoch 0; its figures under "start")."""
    from trainer.probe import fit_probe  # probe.py builds on fit.py's helpers

    folder = run.out / "probe"

    def probe() -> dict[str, float]:
        result = fit_probe(run.config, folder)
        return {role: result[role]["top1"] for role in ("val", "test") if role in result} | {"l2": result["l2"]}

    run.probe = from_main(probe)  # the other ranks wait as long as it takes (not NCCL's 10-minute barrier)
    head = load_checkpoint(folder / "probe.pt")["model"]
    run.model.module.load_state_dict(head)
    if run.ema is not None:  # its copy now holds the starting point, which best.pt's epoch 0 saves below
        run.ema = make_ema(run.model.module, run.config.ema_epochs * run.train.num_batches)
    if run.val is not None:
        result = evaluate(run.kept, run.val.epoch(0), new_meter_for(run.dataset, run.device), amp=run.amp,
                          num_batches=run.val.num_batches, on_corrupt=run.config.on_corrupt)
        run.state.start = val_columns(result)
        run.state.best, run.state.best_epoch = run.state.start[run.config.metric], 0
        save(run, "best.pt")


def stop_early(run: Run) -> bool:
    return bool(run.config.patience) and run.state.bad_epochs >= run.config.patience


def run_epoch(run: Run, progress: Callable[[int, Step], None]) -> dict[str, Any]:
    config, state, epoch = run.config, run.state, run.state.epoch
    set_frozen(run.model, epoch < config.freeze_epochs, config.freeze_bn and config.weights != "none")
    sums = train(run, wrapped(run, epoch < config.freeze_epochs), progress)
    row = epoch_row(run, sums)
    if run.val is not None:
        meter = new_meter_for(run.dataset, run.device)
        result = evaluate(run.kept, run.val.epoch(epoch), meter, amp=run.amp, num_batches=run.val.num_batches,
                          on_corrupt=config.on_corrupt, after_step=lambda s: progress(epoch, s))
        row |= val_columns(result)
        val_retries, val_resumed = all_sum([result["retries"], result["resumed"]], run.device)
        row["retries"] += int(val_retries)  # URL DATA: the validation reads' too
        row["resumed"] += int(val_resumed)
    state.epoch, state.batch, state.partial = epoch + 1, 0, {}
    judge(run, row)
    if config.save_epochs:
        save(run, f"epoch-{epoch + 1}.pt")
    save(run, "last.pt")
    return row


def wrapped(run: Run, frozen: bool) -> nn.Module:
    """The module trained on: DDP and torch.compile around the model, built again only when the trainable
    set changes (DDP registers its parameters once; a compile per epoch runs past dynamo's recompile limit
    and silently falls back to eager)."""
    if run.wrapped is None or run.wrapped[0] != frozen:
        model: nn.Module = run.model.module
        if run.dist.world > 1:
            model = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
        if run.config.compile:
            model = torch.compile(model)
        run.wrapped = (frozen, model)
    return run.wrapped[1]


def check_finite(module: nn.Module, name: str) -> None:
    """Never write weights that hold nan or inf (a step with a finite loss can still make them: --lr 1e30)
    over a good checkpoint; one host sync per checkpoint, not per step."""
    floats = [tensor for tensor in module.state_dict().values() if tensor.is_floating_point()]
    if floats and not bool(torch.stack([torch.isfinite(tensor).all() for tensor in floats]).all()):
        raise TrainError(f"the weights hold nan or inf: {name} was not written (the one on disk keeps the last "
                         "finite weights); lower --lr")


def train(run: Run, model: nn.Module, progress: Callable[[int, Step], None]) -> TrainSums:
    config, state = run.config, run.state
    num_batches = run.train.num_batches
    # laid out once, at the start: a resume with more --epochs trains on at the floor LR, never jumps back up
    total = (state.schedule_epochs or config.epochs) * num_batches
    warmup = round(config.warmup_epochs * num_batches)
    unfrozen = config.freeze_epochs * num_batches  # the backbone's first step: its own warmup from here
    rewarm = backbone_warmup_steps(config, num_batches)
    sums = TrainSums(**state.partial) if state.partial else TrainSums()

    def set_lr() -> None:
        lr = lr_at(state.step, base=config.lr, total=total, warmup=warmup, floor=config.min_lr)
        backbone = ramp(state.step, unfrozen, rewarm)
        for group in run.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"] * (backbone if group.get("part") == "backbone" else 1.0)

    def after_step(step: Step) -> None:
        state.step, state.batch = state.step + 1, step.batch
        if run.ema is not None:
            run.ema.update_parameters(run.model.module)
        if run.keys is not None:
            run.keys.write(state.epoch, state.step, step.keys)
        if config.checkpoint_every and state.step % config.checkpoint_every == 0 and step.batch < num_batches:
            step.read()  # the device's sums of the steps since the last read (and their nan/inf check)
            state.partial = {k: v for k, v in asdict(sums).items() if k != "skipped"}
            save(run, "last.pt")
        progress(state.epoch, step)

    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    return train_one_epoch(model, run.train.epoch(state.epoch, state.batch), run.optimizer, criterion=criterion,
                           amp=run.amp, set_lr=set_lr, mix=make_mix(config, len(run.dataset.classes)), sums=sums,
                           start_batch=state.batch, num_batches=num_batches, on_corrupt=config.on_corrupt,
                           after_step=after_step, **agreed_skips(run))


def backbone_warmup_steps(config: FitConfig, num_batches: int) -> int:
    """Optimizer steps over which the backbone's LR ramps up from 0 once it trains (it multiplies the schedule)."""
    if config.unfreeze_warmup_epochs is not None:
        return round(config.unfreeze_warmup_epochs * num_batches)
    return max(num_batches, BACKBONE_WARMUP_STEPS)


def agreed_skips(run: Run) -> dict[str, Callable[[Batch], bool]]:
    """Under DDP with --on-corrupt skip, every rank skips a step when any rank's batch is empty."""
    if run.dist.world == 1 or run.config.on_corrupt == "fail":
        return {}
    return {"skip_step": lambda batch: any_rank(not len(batch), run.device)}


def make_mix(config: FitConfig, num_classes: int) -> Callable[..., Any] | None:
    from torchvision.transforms import v2

    mixes = [m for alpha, m in ((config.mixup, v2.MixUp), (config.cutmix, v2.CutMix)) if alpha > 0]
    if not mixes:
        return None
    alphas = [a for a in (config.mixup, config.cutmix) if a > 0]
    return v2.RandomChoice([m(alpha=a, num_classes=num_classes) for m, a in zip(mixes, alphas)])


def epoch_row(run: Run, sums: TrainSums) -> dict[str, Any]:
    loss, correct, seen, seconds, wait, skipped, retries, resumed = all_sum(
        [sums.loss, sums.correct, sums.seen, sums.seconds, sums.data_seconds, len(sums.skipped), sums.retries,
         sums.resumed], run.device)
    world, total = run.dist.world, seconds + wait  # seconds: compute only; wait: blocked on the loader
    backbone_lr = next((g["lr"] for g in run.optimizer.param_groups if g.get("part") == "backbone"), None)
    return {"epoch": run.state.epoch + 1, "lr": run.optimizer.param_groups[-1]["lr"], "backbone_lr": backbone_lr,
            "train_loss": loss / max(seen, 1), "train_top1": correct / max(seen, 1),
            "img_s": seen / max(total / world, 1e-9), "data_wait": wait / max(total, 1e-9),
            "seconds": total / world, "skipped": int(skipped), "retries": int(retries), "resumed": int(resumed)}


def new_meter_for(dataset: Dataset | Mixture, device: torch.device) -> EvalMeter:
    names, maps = level_maps_from_manifest(dataset.classes, dataset.manifest.get("hierarchy"))
    return EvalMeter(len(dataset.classes), [m.to(device) for m in maps], names, dataset.class_names)


def val_columns(result: dict[str, Any], prefix: str = "val") -> dict[str, Any]:
    """metrics.csv's columns of an evaluation: loss, top-1, top-5, balanced accuracy, per level, and per class
    (val_acc_NAME) up to CLASS_COLUMNS classes (summary.json has every class's)."""
    row = {f"{prefix}_{k}": result[k] for k in ("loss", "top1", "top5", "balanced_acc")}
    row |= {f"{prefix}_{name}": acc for name, acc in (result.get("level_acc") or {}).items()}
    if len(result["class_acc"]) <= CLASS_COLUMNS:
        row |= {f"{prefix}_acc_{name}": acc for name, acc in result["class_acc"].items()}
    return row


def judge(run: Run, row: dict[str, Any]) -> None:
    """best.pt when the chosen metric improves; counts epochs without improvement for --patience."""
    metric = run.config.metric if run.val is not None else "train_loss"
    value = row.get(metric)
    better = value is not None and (run.state.best is None or
                                    (value < run.state.best if metric.endswith("loss") else value > run.state.best))
    if better:
        run.state.best, run.state.best_epoch, run.state.bad_epochs = value, row["epoch"], 0
        save(run, "best.pt")
    else:
        run.state.bad_epochs += 1


def finish(run: Run, progress: Callable[[int, Step], None]) -> dict[str, Any]:
    """Evaluate best.pt on the test split (else val) and write the confusion matrix and summary.json."""
    barrier()
    best = load_checkpoint(run.out / "best.pt") if (run.out / "best.pt").is_file() else None
    summary: dict[str, Any] = {"best_epoch": run.state.best_epoch, "best": {run.config.metric: run.state.best},
                               "epochs": run.state.epoch, "steps": run.state.step}
    if run.probe:
        summary["probe"] = run.probe  # the head fit started from: its top-1 (val, test) before fine-tuning
    if run.state.start:
        summary["start"] = run.state.start  # that starting point validated as the epochs are (best_epoch 0)
    split = "test" if run.dataset.has_split("test") else (run.config.val_split if run.val is not None else None)
    if best is not None and split is not None:
        run.model.module.load_state_dict(best["model"])
        spec = loader_spec(run.config, run.dataset, run.model, run.dist, run.device, split, False)
        loader = make_loader(spec, run.config.loader)
        meter = new_meter_for(run.dataset, run.device)
        result = evaluate(run.model.module, loader.epoch(0), meter, amp=run.amp, num_batches=loader.num_batches,
                          on_corrupt=run.config.on_corrupt, after_step=lambda s: progress(run.state.epoch, s))
        summary[split] = {k: v for k, v in result.items()}
        summary["evaluated_split"] = split
        if run.dist.main:
            write_confusion(meter.confusion.cpu(), run.dataset.class_names, run.out / "confusion.png")
    if run.dist.main:
        write_summary(summary, run.out / "summary.json")
    return summary
