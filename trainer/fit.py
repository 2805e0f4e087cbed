"""fit: the composition, top to bottom.

    manifest -> loaders (train, val) -> model from the registry, new head -> optimizer (head lr, backbone lr * mult)
    for each epoch: freeze or unfreeze -> train_one_epoch (mid-epoch last.pt) -> evaluate -> log -> best.pt/last.pt
    at the end: best.pt on the test split (when there is one) -> confusion matrix, summary.json
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shardtool.options import check_output_folder
from trainer.checkpoint import load_checkpoint
from trainer.config import BACKBONE_WARMUP_STEPS, FitConfig, write_yaml
from trainer.data import Batch, make_loader
from trainer.distributed import Dist, all_sum, any_rank, barrier, from_main
from trainer.errors import ConfigError
from trainer.keylog import KeyLog
from trainer.loop import Step, TrainSums, evaluate, train_one_epoch
from trainer.metrics import CLASS_COLUMNS, RunLog, new_meter_for
from trainer.probe import fit_probe
from trainer.run import Run, build_run, loader_spec, make_ema, save, set_frozen
from trainer.schedule import lr_at, ramp

write_confusion, write_summary = RunLog.write_confusion, RunLog.write_summary


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
