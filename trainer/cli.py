"""The trainer command line: fit, evaluate, predict, probe, export, serve. Parse, delegate to the library, render with rich."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from shardtool.cli import console, err, one_line_errors
from shardtool.options import Bounded, Device, Output, Range
from shardtool.readers.common import shown
from trainer import __version__
from trainer.config import EVAL_BATCH, RANGES, default_workers


HELP = {
    "model": "Backbone: efficientnet_lite0 (offline), tiny_cnn, a torchvision or a timm name.",
    "weights": "imagenet | none | PATH of a state dict (torchvision/timm imagenet weights need the network).",
    "epochs": "Epochs in all.", "batch_size": "Samples per batch on each process [0: from the device: 32 on a CPU; on a GPU 8 per GB of "
                  "its memory at 224 px, fewer for larger images, a power of 2 from 32 to 512: 512 on an 80 GB card, "
                  "128 on 24 GB]. --lr is the peak LR whatever the batch.",
    "image_size": "Side the model trains on, 32 to 4096 [0: the model's own].",
    "eval_image_size": "Side for validation, test and predict, 32 to 4096 [0: --image-size]; a little above it often "
                       "scores higher after RandomResizedCrop training (FixRes).", "optimizer": "adamw | sgd.",
    "lr": "Peak LR of the head (above 0); the backbone gets lr x --backbone-lr-mult.",
    "backbone_lr_mult": "Backbone LR as a fraction of --lr once unfrozen.", "weight_decay": "Weight decay [adamw: "
                      "0.05, decoupled; sgd: 1e-4, an L2 term].",
    "momentum": "SGD momentum.", "warmup_epochs": "Linear warmup, then cosine decay.",
    "min_lr": "Cosine floor as a fraction of --lr.",
    "head_init": "probe: start the head as the linear probe's (fitted on the frozen backbone's cached features "
                 "in OUT/probe, then fine-tune everything: LP-FT) | random | auto: probe with pretrained weights.",
    "freeze_epochs": "Train only the head for this many epochs (backbone frozen, its BatchNorm in eval).",
    "unfreeze_warmup_epochs": "From its first trainable step (after --freeze-epochs, or the first step), the "
                              "backbone's LR ramps up from 0 over this many epochs [one epoch, and at least 100 "
                              "steps: a full LR at once undoes pretrained features on small datasets].",
    "freeze_bn": "Keep the pretrained BatchNorm statistics after unfreezing too, as Keras' EfficientNet "
                 "fine-tuning guide does (92% vs 90% on clothing-small here); no effect with --weights none.",
    "label_smoothing": "Cross-entropy label smoothing.",
    "ema_epochs": "Validate, keep and export an exponential moving average of the weights with this time "
                  "constant in epochs (0: off); it starts at the LP-FT starting point.",
    "crop_scale": "Smallest area fraction of RandomResizedCrop (ImageNet training uses 0.08; short fine-tunes do better higher).", "mixup": "MixUp alpha (0: off).", "cutmix": "CutMix alpha (0: off).",
    "amp": "auto | bf16 | fp16 | none (auto: bf16 on CPUs and GPUs that have it).",
    "channels_last": "channels_last memory format.", "compile": "torch.compile the model.",
    "loader": "auto | torch | dali (auto: dali on a GPU when installed, else torch). dali on a GPU: nvJPEG decodes "
              "(chroma upsampled as PIL does, buffers padded as DALI's ResNet-50 example) with --workers CPU threads.",
    "workers": "Decode processes per training process, or DALI's threads [the CPUs this process may use, shared "
               "among torchrun's processes on this machine, at most 16].", "shuffle_buffer": "Samples in the shuffle buffer.",
    "train_split": "Split to train on.", "val_split": "Split to validate on (val finds validation).",
    "metric": "val_top1 | val_top5 | val_loss | val_balanced_acc (the mean of per-class recall): what best.pt is "
              "chosen by.",
    "patience": "Stop after this many epochs without improvement (0: never).",
    "checkpoint_every": "Optimizer steps between mid-epoch saves of last.pt (0: epoch ends only).",
    "save_epochs": "Also keep each epoch's validated weights as OUT/epoch-N.pt (best.pt's format: evaluate, "
                   "predict and export take it).",
    "on_corrupt": "fail: stop at a corrupt sample naming shard and key | skip: count it and go on.",
    "norm": "model: normalise with the backbone's mean/std | dataset: with the manifest's.",
    "device": "auto | cpu | cuda | cuda:N.", "seed": "Seed of the data order, augmentation and head init.",
    "sampling": "How training draws samples: uniform (each once an epoch) | balanced (every class equally often) | "
                "sqrt (a class in proportion to the square root of its count) | weights:FILE (in proportion to "
                "FILE's weights: JSON {class: weight} or CSV class,weight, every class named, 0 leaves one out). "
                "Other than uniform a sample may be drawn several times or not at all; blocks of the shards are "
                "streamed as for uniform (--loader torch); validation and test stay unweighted.",
    "mix": "Several DATA (trainer fit DATA1 DATA2 OUT): each one's share of an epoch's draws, in DATA's order, "
           "e.g. 0.7,0.3, within which --sampling applies [none: the DATA are one pool]. Numbers only, so any "
           "DATA stays a plain path or URL (a suffix such as DATA:0.7 would read http://host:8080 or C:\\data "
           "as a share).",
    "epoch_size": "Draws per epoch, all processes together [0: the train split's size, of every DATA]; other "
                  "sizes, like --sampling and --mix, draw with repeats.",
    "log_keys": "Write every training batch's sample keys to OUT/keys/rank-R.tsv (audit of exact epochs/resume).",
    "timeout": "URL DATA: seconds without a byte before a request is retried (resumed from the byte it reached).",
    "retries": "URL DATA: failed requests in a row, without progress, before the run stops naming the shard "
               "and byte range (--on-corrupt skip: counts the samples lost and goes on).",
    "cache": "URL DATA: keep whole shards in this folder (checked against the manifest's sha256; needed by "
             "--loader dali).",
    "cache_size": "GB the --cache may hold; least recently used shards go first [0: no cap].",
}


def remote_options(command: Any) -> Any:
    """--timeout, --retries, --cache, --cache-size for evaluate and predict, as fit has them (FitConfig)."""
    from trainer.config import FitConfig

    defaults = {f.name: f.default for f in dataclasses.fields(FitConfig)}
    for name in reversed(("timeout", "retries", "cache", "cache_size")):
        kind = Bounded(RANGES[name]) if name in RANGES else Output(folder=True)
        command = click.option("--" + name.replace("_", "-"), name, type=kind, default=defaults[name],
                               show_default=True, help=HELP[name])(command)
    return command


def eval_options(workers_help: str) -> Callable[[Any], Any]:
    """--batch-size, --workers, --loader, --device and --amp, as evaluate and predict both take them."""
    options = [
        click.option("--batch-size", type=Bounded(EVAL_BATCH), default=64, show_default=True),
        click.option("--workers", type=Bounded(RANGES["workers"]), default=default_workers(), show_default=True,
                     help=workers_help),
        click.option("--loader", default="auto", show_default=True, type=click.Choice(["auto", "torch", "dali"])),
        click.option("--device", type=Device(), default="auto", show_default=True, help=HELP["device"]),
        click.option("--amp", default="", help="Shards: auto | bf16 | fp16 | none [the checkpoint's]; none gives "
                                               "exactly what predict on files, export and serve give (float32)."),
    ]

    def add(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command
    return add


def remote_from(options: dict[str, Any]) -> Any:
    from trainer.remote import Remote

    return Remote(timeout=options["timeout"], retries=options["retries"], cache=options["cache"],
                  cache_gb=options["cache_size"])


Command = one_line_errors("interrupted: `trainer fit ... --resume` continues from the last checkpoint")


def fit_options(command: Any) -> Any:
    """One --flag per FitConfig field (defaults shown from the dataclass), so the two never drift apart."""
    from trainer.config import FitConfig

    kinds: dict[str, click.ParamType] = {"device": Device(), "cache": Output(folder=True)}
    for f in reversed([f for f in dataclasses.fields(FitConfig) if f.name not in ("data", "out")]):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            command = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=f.default,
                                   show_default=True, help=HELP[f.name])(command)
        else:
            kind = Bounded(RANGES[f.name]) if f.name in RANGES else kinds.get(f.name, click.STRING)
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            command = click.option(flag, f.name, type=kind, default=default, show_default=True,
                                   help=HELP[f.name])(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="trainer")
def main() -> None:
    """Train, evaluate, predict and linear-probe from shardtool shards; predict on image files, export, serve."""
    from trainer.host import keep_freed_memory

    keep_freed_memory()  # freed activations stay in the process (trainer/host.py; TRAINER_MALLOC=system: off)


@main.command(cls=Command)
@click.argument("data", nargs=-1, required=True)
@click.argument("out", type=Output(folder=True))
@click.option("--config", "config_path", type=click.Path(), help="YAML file of options; flags override it.")
@click.option("--resume", is_flag=True, help="Continue OUT's run exactly from OUT/last.pt (--epochs may change: "
                                            "extra epochs run at the schedule's floor LR).")
@click.option("--overwrite", is_flag=True, help="Start again in an OUT that holds a run.")
@fit_options
def fit(data: tuple[str, ...], out: str, config_path: str | None, resume: bool, overwrite: bool,
        **options: Any) -> None:
    """Fine-tune a pretrained CNN on DATA (a shardtool output, URL or shard pattern; several with one class
    list are trained on together, see --mix); write the run to OUT."""
    from trainer import distributed
    from trainer.checkpoint import load_checkpoint
    from trainer.config import build_config, resumed_config
    from trainer.fit import fit as run_fit

    ctx = click.get_current_context()
    given = {k: v for k, v in options.items()
             if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    given |= {"data": data[0] if len(data) == 1 else list(data), "out": out}
    if resume:
        config = resumed_config(load_checkpoint(Path(out) / "last.pt")["config"], given)
    else:
        config = build_config(given, config_path)  # the dataclass's defaults under what was given
    dist = distributed.setup(config.device)
    try:
        with EpochProgress(enabled=dist.main) as bar:
            summary = run_fit(config, dist, resume=resume, overwrite=overwrite, progress=bar.update,
                              on_epoch=bar.epoch_done)
    finally:
        distributed.cleanup()
    if dist.main:
        render_summary(summary, out)


class Bars:
    """A rich Progress on stderr, entered and left with its owner (one per command)."""

    bar: Progress

    def __enter__(self) -> Bars:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)


class EpochProgress(Bars):
    """A rich bar per epoch phase and one line per finished epoch."""

    def __init__(self, enabled: bool) -> None:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
        self.bar = Progress(*columns, console=err, disable=not (enabled and err.is_terminal))
        self.enabled = enabled
        self.task: Any = None
        self.key: tuple[int, str] | None = None

    def update(self, epoch: int, step: Any) -> None:
        if self.key != (epoch, step.phase):
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.key = (epoch, step.phase)
            self.task = self.bar.add_task(f"epoch {epoch + 1} {step.phase}", total=step.num_batches, info="")
        rate = step.samples / max(step.seconds, 1e-9)
        info = f"loss {step.loss:.3f} {rate:.0f} img/s" if step.phase == "train" else f"{rate:.0f} img/s"
        self.bar.update(self.task, completed=step.batch, info=info)

    def epoch_done(self, row: dict[str, Any]) -> None:
        if self.enabled:
            shown = {k: v for k, v in row.items() if k != "epoch" and v is not None}
            text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
            console.print(f"epoch {row['epoch']}: {text}", markup=False)


def render_summary(summary: dict[str, Any], out: str) -> None:
    split = summary.get("evaluated_split")
    if split:
        result = summary[split]
        levels = "".join(f"  {k} {v:.2%}" for k, v in (result.get("level_acc") or {}).items() if v is not None)
        epoch = summary["best_epoch"] or "0 (no epoch beat the linear probe it started from)"
        console.print(f"best epoch {epoch}: {split} top-1 {result['top1']:.2%}  top-5 "
                      f"{result['top5']:.2%}  {balanced(result)}loss {result['loss']:.4f}  "
                      f"({result['num_samples']} images){levels}", markup=False)
        render_classes(result)
    console.print(f"run written to {out}: best.pt, last.pt, metrics.csv, curves.png, tb/, summary.json", markup=False)


@main.command(cls=Command)
@click.argument("ckpt", type=click.Path())
@click.argument("data")
@click.option("--split", default="test", show_default=True, help="Split to evaluate.")
@eval_options("Decode processes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (top1, top5, loss, num_samples, ...).")
@remote_options
def evaluate(ckpt: str, data: str, split: str, batch_size: int, workers: int, loader: str, device: str, amp: str,
             as_json: bool, **remote: Any) -> None:
    """Evaluate checkpoint CKPT on a split of DATA: loss, top-1, top-5, accuracy per category level."""
    from trainer.predict import evaluate_checkpoint, load_predictor

    predictor = load_predictor(ckpt, data, device, amp, remote_from(remote))
    result, _ = evaluate_checkpoint(predictor, split, batch_size=batch_size, workers=workers, loader=loader)
    if as_json:
        click.echo(json.dumps(result | {"split": split}))
        return
    levels = "".join(f"  {k} {v:.2%}" for k, v in (result.get("level_acc") or {}).items() if v is not None)
    console.print(f"{split}: top-1 {result['top1']:.2%}  top-5 {result['top5']:.2%}  {balanced(result)}"
                  f"loss {result['loss']:.4f}  ({result['num_samples']} images){levels}", markup=False)
    render_classes(result)


def balanced(result: dict[str, Any]) -> str:
    value = result.get("balanced_acc")
    return "" if value is None else f"balanced {value:.2%}  "


def render_classes(result: dict[str, Any]) -> None:
    """Each class's accuracy (its recall) on one line; past CLASS_COLUMNS classes, the five lowest."""
    from trainer.metrics import CLASS_COLUMNS

    known = {name: acc for name, acc in (result.get("class_acc") or {}).items() if acc is not None}
    shown = known if len(known) <= CLASS_COLUMNS else dict(sorted(known.items(), key=lambda item: item[1])[:5])
    what = "per class" if len(shown) == len(known) else f"lowest 5 of {len(known)} classes (all: --json, summary.json)"
    if shown:
        console.print(f"{what}: " + "  ".join(f"{name} {acc:.1%}" for name, acc in shown.items()), markup=False)


@main.command(cls=Command)
@click.argument("ckpt", type=click.Path())
@click.argument("inputs", nargs=-1, required=True)
@click.option("--split", default="test", show_default=True, help="Shards: split to predict (unlabelled too).")
@click.option("--out", "out", default="", type=Output(),
              help="Shards: CSV to write [preds.csv]. Files: write .csv (file,rank,label,index,prob,error) or "
                   ".json instead of printing a table.")
@click.option("--group", is_flag=True, help="Shards: one row per group (product) from averaged probabilities: "
                                            "_id,category_id.")
@click.option("-k", "--top-k", "k", type=Bounded(Range(int, 1)), default=5, show_default=True,
              help="Files: labels per image.")
@click.option("--json", "as_json", is_flag=True, help="Files: print one JSON object per file instead of a table.")
@eval_options("Shards: decode processes.")
@remote_options
def predict(ckpt: str, inputs: tuple[str, ...], split: str, out: str, group: bool, k: int, as_json: bool,
            batch_size: int, workers: int, loader: str, device: str, amp: str, **remote: Any) -> None:
    """Predict with CKPT on a split of shards (DATA) or on image files, folders and globs.

    \b
    trainer predict run/best.pt DATA --split test --out preds.csv [--group]
    trainer predict run/best.pt photo.jpg photos/ 'more/*.png' [-k 3] [--out preds.csv|.json] [--json]

    Files are read as pack reads them (EXIF rotation, greyscale, CMYK, 16-bit, alpha) and preprocessed as
    evaluate does; a file that is not a readable image gets its error and the others go on (exit 1 then).
    """
    from trainer.predict import is_shards

    if len(inputs) == 1 and is_shards(inputs[0]):
        from trainer.predict import load_predictor, predict_csv

        predictor = load_predictor(ckpt, inputs[0], device, amp, remote_from(remote))
        target = Path(out or "preds.csv")
        rows = predict_csv(predictor, split, target, group=group, batch_size=batch_size, workers=workers,
                           loader=loader)
        console.print(f"wrote {rows:,} {'groups' if group else 'predictions'} to {target}", markup=False)
        return
    from trainer.infer import Classifier, expand_inputs
    from trainer.predict import write_results

    files = expand_inputs(inputs)
    results = Classifier.load(ckpt, device).classify_many(files, k=k, batch_size=batch_size)
    if out:
        done = write_results(results, Path(out))
    elif as_json:
        done = []
        for result in results:
            done.append(result)
            click.echo(json.dumps(result.to_dict()))
    else:
        done = render_results(results)
    failed = sum(not r.ok for r in done)
    if out:
        console.print(f"wrote {len(done) - failed:,} predictions to {out}", markup=False)
    if failed:
        err.print(f"{failed:,} of {len(done):,} files could not be classified (see their errors)")
        sys.exit(1)


def render_results(results: Any) -> list[Any]:
    """One line per file as it is classified: the top labels with probabilities, or the file's error."""
    done = []
    for result in results:
        done.append(result)
        if result.ok:
            labels = "  ".join(f"{label.label} {label.prob:.1%}" for label in result.top)
            console.print(f"{shown(result.source)}  {labels}", markup=False)
        else:  # a file's name may hold a terminal escape code: shown() spells it out
            err.print(f"{escape(shown(result.source))}  [red]error:[/red] {escape(shown(result.error))}")
    return done


@main.command(cls=Command)
@click.argument("ckpt", type=click.Path())
@click.argument("out", type=Output())
@click.option("--format", "fmt", default="onnx", show_default=True, type=click.Choice(["onnx", "torchscript"]))
@click.option("--check-data", "data", default="",
              help="Also check parity on every image of a split of this shardtool output (else random inputs only).")
@click.option("--split", default="test", show_default=True, help="Split of --check-data.")
@click.option("--batch-size", type=Bounded(EVAL_BATCH), default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar (with parity) as JSON.")
def export(ckpt: str, out: str, fmt: str, data: str, split: str, batch_size: int, as_json: bool) -> None:
    """Export CKPT to OUT (ONNX or TorchScript, dynamic batch axis) and a JSON sidecar OUT.json beside it.

    The file takes float32 N x 3 x S x S preprocessed as the sidecar says and returns logits and
    probabilities. It is written only if it matches the checkpoint in PyTorch (top-1 equal, probabilities
    within 1e-4) on random inputs and, with --check-data, on every image of a split.
    """
    from trainer.export import export as run_export

    with BatchProgress("parity") as bar:
        result = run_export(ckpt, Path(out), fmt, data=data, split=split, batch_size=batch_size, progress=bar.update)
    if as_json:
        click.echo(json.dumps(result))
        return
    parity = result["parity"]
    console.print(f"wrote {result['path']} and {result['sidecar']}: {len(result['classes'])} classes, input "
                  f"{'x'.join(map(str, result['input']['shape']))}", markup=False)
    for source, p in parity["by_input"].items():
        console.print(f"parity with the checkpoint on {p['images']} {source} images: top-1 equal for "
                      f"{p['top1_equal']}/{p['images']}, max probability difference {p['max_prob_diff']:.2e} "
                      f"(tolerance {parity['tolerance']:g})", markup=False)


class BatchProgress(Bars):
    """One rich bar over batches."""

    def __init__(self, what: str) -> None:
        columns = [TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        self.bar = Progress(*columns, console=err, disable=not err.is_terminal)
        self.task: Any = None

    def update(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.bar.add_task("", total=total)
        self.bar.update(self.task, completed=done)


@main.command(cls=Command)
@click.argument("model", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=Bounded(Range(int, 1, 65535)), default=8000, show_default=True)
@click.option("--max-batch", type=Bounded(Range(int, 1)), default=16, show_default=True,
              help="Requests answered by one forward pass at most.")
@click.option("--max-wait-ms", type=Bounded(Range(float, 0, 60_000)), default=5.0, show_default=True,
              help="How long the first request of a batch waits for others.")
@click.option("--max-upload-mb", type=Bounded(Range(float, 0, low_open=True)), default=20.0, show_default=True,
              help="Bigger uploads get 413.")
@click.option("--device", type=Device(), default="auto", show_default=True, help=HELP["device"])
@click.option("--header-timeout", type=Bounded(Range(float, 0.1, 3600)), default=10.0, show_default=True,
              help="Seconds a client has to send a request's headers; then its connection is closed (slowloris).")
def serve(model: str, host: str, port: int, max_batch: int, max_wait_ms: float, max_upload_mb: float,
          device: str, header_timeout: float) -> None:
    """Serve MODEL (a checkpoint, or an ONNX file from trainer export) over HTTP: the upload page at /,
    POST /predict (multipart file or raw bytes, ?k=5), GET /health and /info."""
    import uvicorn

    from trainer.infer import Classifier
    from trainer.serve.app import ServeConfig, create_app
    from trainer.serve.protocol import with_header_timeout

    config = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_upload_bytes=int(max_upload_mb * 1e6))
    app = create_app(Classifier.load(model, device), config)
    err.print(f"serving {model} at http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning", http=with_header_timeout(header_timeout))


@main.command(cls=Command)
@click.argument("data")
@click.option("--model", default="efficientnet_lite0", show_default=True, help=HELP["model"])
@click.option("--weights", default="imagenet", show_default=True, help=HELP["weights"])
@click.option("--image-size", type=Bounded(RANGES["image_size"]), default=0, show_default=True,
              help="Side of the centre crop every split is seen at (shorter side to side/0.875 first, as fit "
                   "evaluates) [0: the model's own].")
@click.option("--out", "out", default="", type=Output(folder=True),
              help="Folder of the feature cache [DATA/.probe/MODEL]; reused while model, weights, seed, "
                   "preprocessing, amp, loader and the shards' sha256 match.")
@click.option("--save", default="", type=Output(),
              help="Write backbone + head to this checkpoint, for trainer evaluate / predict.")
@click.option("--batch-size", type=Bounded(EVAL_BATCH), default=64, show_default=True,
              help="Images per batch while extracting.")
@click.option("--workers", type=Bounded(RANGES["workers"]), default=default_workers(), show_default=True, help="Decode processes.")
@click.option("--loader", default="auto", show_default=True, type=click.Choice(["auto", "torch", "dali"]))
@click.option("--amp", default="auto", show_default=True, help=HELP["amp"])
@click.option("--device", type=Device(), default="auto", show_default=True, help=HELP["device"])
@click.option("--seed", type=Bounded(RANGES["seed"]), default=0, show_default=True,
              help="Initialises a random-init backbone (tiny_cnn, --weights none).")
@click.option("--train-split", default="train", show_default=True, help="Split the head is trained on.")
@click.option("--val-split", default="val", show_default=True,
              help="Split the L2 is chosen on (val finds validation; absent: L2 0.1).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (per split top1, top5, loss; l2, cached, ...).")
def probe(data: str, as_json: bool, **options: Any) -> None:
    """Linear probe: a softmax head on DATA's frozen-backbone features (extracted once, cached); val/test top-1.

    The number every fine-tune should beat; --save writes a checkpoint that evaluate and predict read.
    """
    from trainer.probe import ProbeConfig
    from trainer.probe import probe as run_probe

    with SplitProgress() as bar:
        result = run_probe(ProbeConfig(data=data, **options).validate(), progress=bar.update)
    if as_json:
        click.echo(json.dumps(result))
        return
    render_probe(result)


class SplitProgress(Bars):
    """A rich bar per split while features are extracted."""

    def __init__(self) -> None:
        columns = [TextColumn("features {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        self.bar = Progress(*columns, console=err, disable=not err.is_terminal)
        self.tasks: dict[str, Any] = {}

    def update(self, role: str, done: int, total: int) -> None:
        if role not in self.tasks:
            self.tasks[role] = self.bar.add_task(role, total=total)
        self.bar.update(self.tasks[role], completed=done)


def render_probe(result: dict[str, Any]) -> None:
    seconds, rows = result["seconds"], {role: result[role]["num_samples"] for role in result["splits"]}
    how = "cached" if result["cached"] else f"extracted in {seconds['features']:.1f} s"
    sizes = ", ".join(f"{role} {n:,}" for role, n in rows.items())
    console.print(f"features: {result['feature_dim']}-d, {how} ({sizes}) in {result['cache']}", markup=False)
    chosen = f"by val top-1 from {len(result['grid'])} values" if result["grid"] else "(no val split to choose by)"
    console.print(f"head: L2 {result['l2']:g} {chosen}, {seconds['head']:.1f} s", markup=False)
    for role, split in result["splits"].items():
        r = result[role]
        console.print(f"{role} ({split}): top-1 {r['top1']:.2%}  top-5 {r['top5']:.2%}  loss {r['loss']:.4f}  "
                      f"({r['num_samples']} images)", markup=False)
    if result["saved"]:
        console.print(f"saved backbone + head to {result['saved']} (trainer evaluate / predict read it)", markup=False)
