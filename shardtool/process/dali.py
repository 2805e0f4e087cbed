"""The DALI processor: pil.process_batch's contract (items in, encoded Sample | Skip out, in order), with
decoding and resizing done by DALI, the decoder family the trainer's DALI loader uses.

    item -> load_bytes, open_image, planned (guard.py: exists within the byte cap, an image, not a bomb,
            the planned resize within --max-pixels; PIL parses the header only) -> Skip | job
         -> DALI gets what its decoder turns into the same RGB as pil.to_rgb (_dali_decodes); the rest
            (alpha, palettes, GIF, raw pixel rows, ...) goes through pil.process unchanged
    jobs -> one pipeline run per batch of 32, one definition, the device is a switch:
              fn.decoders.image(RGB, EXIF orientation applied)   device "cpu", or "mixed" (nvJPEG) on a GPU
              fn.resize(geometry.plan's scaled size, linear, antialiased), as PIL's BILINEAR
              fn.slice(the plan's canvas, black where uncovered)  fit crops, pad pads, the rest is a no-op
         -> uint8 H x W x 3 on the host -> JPEG or PNG by PIL's encoder, as the PIL path; the input bytes when they already fit

DALI decodes JPEGs only, after the strict libjpeg-turbo pass of _jpeg_damage has found nothing wrong with
them: DALI stops a whole batch on one undecodable image, and DALI 2.4 then cannot build another pipeline in
that process (it segfaulted building the next one in 1 of 3 runs of 120 failed batches, under load; the
failed pipeline cannot run again either). Every other format takes the PIL path, as damaged images do.
Should DALI fail on a batch all the same, that batch and the rest of this process's items take the PIL
path, with one warning line naming the first image: nothing is lost, and the process does not crash.

Processes. pack runs this processor in as many worker processes as the PIL path, dali-gpu included (one per
usable CPU by default, --workers N), each with a pipeline of its own whose DALI threads share out the usable
CPUs (threads_per_process: 1 each by default, all of them with --workers 0 or 1), passed in OutputSpec.threads.
The Python work around DALI (the screen's header parse and strict JPEG pass, PIL's encode, the decode for the
statistics) stays on the CPU whatever the device, and only processes spread it over the cores; on a GPU,
nvJPEG takes the decode and resize off them. Every worker process then holds a CUDA context on the GPU (a few
hundred MB each), cheap on a card that trains models. Until issue 34, dali-gpu ran in one worker process whose
DALI got every core as threads, to keep to one CUDA context: DALI's threads spread only the decode and resize,
so that pack did the Python work on one core, several times slower than the PIL path on 16 cores (on 2 cores
here, dali-cpu packs 1.32x as fast in 2 processes x 1 thread as in 1 x 2: benchmarks/dali_cpu_work.py). The workers
fork from a forkserver (parallel.py), a fresh interpreter rather than a fork of the parent, so they inherit no
CUDA state from it: the parent calls cuInit (cuda_devices()) and, under --workers auto, runs the first batches
itself (parallel._auto_map), so it holds one more pipeline and context, idle after them. A small card on a
machine with many cores could run out of memory (DALI's "out of memory" stops the pack with one line);
--workers N lowers the count.
"""

from __future__ import annotations

import ctypes
import importlib.util
import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

from shardtool.cpus import usable_cpus
from shardtool.errors import ConfigError, PackError
from shardtool.process import pil
from shardtool.process.checks import load_bytes, open_image, planned
from shardtool.process.geometry import Plan, plan
from shardtool.sample import Item, Sample, Skip

MAX_BATCH = 32  # pack hands over 32 items at a time (parallel.ordered_map)
CPU_AUTO = "pil"  # --backend auto without a GPU: the faster on CPU here (benchmarks/pack.py, README)
# Modes that DALI decodes to the same RGB as pil.to_rgb (tests/test_dali_backend.py checks them): grey
# replicated, CMYK converted, EXIF orientation applied. JPEGs only (module docstring): PNG, WebP, BMP and
# TIFF, which DALI decodes too, are checked by nothing short of a full decode, so they take the PIL path.
DALI_MODES = {"JPEG": {"RGB", "L", "CMYK"}, "MPO": {"RGB", "L", "CMYK"}}
_QUARTER_TURNS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_pipelines: dict[tuple[str, int], Any] = {}  # one built pipeline per (backend, threads) in this process
_failed: list[Any] = []  # a pipeline that failed, kept: shutting it down or building another can segfault
_LEVELS = np.arange(256, dtype=np.int64)  # a histogram bin's pixel value
# What DALI says when the device, driver or memory failed rather than one image's data
_SYSTEM_FAILURE = re.compile(r"CUDA error|CUDA_ERROR|cuda\w*Error|NVJPEG_STATUS_(ALLOCATOR_FAILURE|EXECUTION_FAILED|INTERNAL_ERROR|"
                             r"ARCH_MISMATCH|NOT_INITIALIZED)|out of memory|[Oo]ut of device memory")


@dataclass(frozen=True)
class _Job:
    item: Sample
    data: bytes
    geometry: Plan
    keep: bool  # already what we write: the input bytes are copied once DALI has decoded them


def choose_backend(requested: str) -> str:
    """--backend auto|dali|pil -> "pil", "dali-cpu" or "dali-gpu"; one clear line when DALI is missing."""
    gpu = cuda_devices() > 0
    if requested == "pil" or requested == "auto" and not gpu and CPU_AUTO == "pil":
        return "pil"
    if importlib.util.find_spec("nvidia.dali") is None:
        if requested == "dali":
            raise ConfigError("--backend dali needs NVIDIA DALI, which is not installed: "
                              "pip install 'shardtool[dali]', or use --backend pil")
        return "pil"
    return "dali-gpu" if gpu else "dali-cpu"


def cuda_devices() -> int:
    """CUDA devices the driver sees, 0 without one; asks libcuda directly (importing DALI takes 0.7 s)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def threads_per_process(processes: int) -> int:
    """DALI's CPU threads in each process that runs batches: the usable CPUs shared among PROCESSES worker
    processes (0: the batches run in this process, which gets them all)."""
    return max(1, usable_cpus() // max(1, processes))


def version() -> str:
    import nvidia.dali

    return nvidia.dali.__version__


def process_batch(items: list[Item], spec: pil.OutputSpec) -> list[Item]:
    """Each item checked, decoded, resized and encoded, in order; DALI batches of up to MAX_BATCH."""
    if _failed:  # DALI failed in this process before: the PIL path for the rest (module docstring)
        return pil.process_batch(items, spec)
    results: list[Item | _Job] = [_screen(item, spec) for item in items]
    jobs = [(index, job) for index, job in enumerate(results) if isinstance(job, _Job)]
    for start in range(0, len(jobs), MAX_BATCH):
        chunk = jobs[start:start + MAX_BATCH]
        decoded = _decode([job for _, job in chunk], spec.backend, spec.threads)
        for (index, job), pixels in zip(chunk, decoded or [None] * len(chunk)):
            results[index] = _finish(job, pixels, spec)
    return results  # type: ignore[return-value]  # every _Job was replaced


def _screen(item: Item, spec: pil.OutputSpec) -> Item | _Job:
    """The cheap checks of the PIL path; a Skip, a finished Sample, or a job for DALI."""
    if isinstance(item, Skip) or item.raw_shape is not None:
        return pil.process(item, spec)
    data = load_bytes(item, spec.max_pixels)
    if isinstance(data, Skip):
        return data
    if spec.verify == "header" and (copied := pil.jpeg_header_copy(item, data, spec)):
        return copied
    image = open_image(item, data, spec.max_pixels)
    if isinstance(image, Skip):
        return image
    if isinstance(checked := planned(item, image.size, spec.resize, spec.max_pixels), Skip):
        return checked  # fn.resize would allocate it: the same check as the PIL path's, before DALI sees it
    if spec.verify == "header" and pil.conforms(image, data, spec):
        return item.with_(data=data, path=None, ext=spec.encode,
                          meta={**item.meta, "width": image.width, "height": image.height})
    if image.format in ("JPEG", "MPO") and (damage := _jpeg_damage(data)):
        return Skip("corrupt_image", item.key, item.source, f"decode: {damage}", item.group, item.split)
    turn = pil.orientation(image)
    if not _dali_decodes(image, turn):
        return pil.process(item.with_(data=data, path=None), spec)
    width, height = (image.height, image.width) if turn in _QUARTER_TURNS else image.size
    geometry = plan(width, height, spec.resize)
    same_format = image.format in ("JPEG", "MPO") and spec.encode == "jpg" or image.format == "PNG" and spec.encode == "png"
    keep = same_format and turn in (None, 1) and image.mode == "RGB" and geometry.identity
    return _Job(item, data, geometry, keep)


def _jpeg_damage(data: bytes) -> str | None:
    """What is wrong with a JPEG's compressed data, if anything: a strict libjpeg-turbo pass at 1/8 scale.

    DALI's CPU decoder decodes a JPEG with garbage inside its entropy-coded data, with warnings on stderr
    and garbage pixels, where PIL raises; so the rule "bad data is a counted skip" needs its own check.
    Scaling in the DCT domain makes this pass a third of a full decode (306 vs 923 us at 400x533 here);
    it found nothing to reject in clothing-small and the FB images (5,281 JPEGs).
    """
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        out = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}.get(colorspace, "RGB")
        simplejpeg.decode_jpeg(data, colorspace=out, strict=True, min_height=1, min_width=1)
    except ValueError as error:
        return str(error)
    return None


def _dali_decodes(image: Image.Image, turn: int | None) -> bool:
    """DALI gives this image the same RGB pixels as the PIL path (EXIF orientation: JPEGs only)."""
    if image.mode not in DALI_MODES.get(image.format or "", ()) or pil.has_alpha(image):
        return False
    return turn in (None, 1) or image.format in ("JPEG", "MPO")


def _decode(jobs: list[_Job], backend: str, threads: int) -> list[np.ndarray] | None:
    """Each job's RGB pixels at its planned size; None when DALI failed on the batch (the PIL path takes it).

    A failure that is not about the images stops the pack with one line instead: the pipeline cannot be
    built (CUDA, driver, nvJPEG, memory), or DALI names CUDA or memory."""
    pipe = _pipeline(backend, threads)  # outside the try: a pipeline that cannot be built is no image's fault
    try:
        return _run(pipe, jobs, backend)
    except RuntimeError as error:  # how DALI reports an operator's failure; the pipeline is unusable after it
        _failed.append(_pipelines.pop((backend, threads)))
        if _SYSTEM_FAILURE.search(str(error)):
            raise PackError(f"DALI ({backend}) failed: {_reason(error)}; --backend pil packs without DALI") from None
        print(f"warning: DALI ({backend}) failed on a batch of {len(jobs)} images that libjpeg-turbo decodes "
              f"(the first: {jobs[0].item.source}): {_reason(error)}; this process packs the rest with the PIL "
              "path", file=sys.stderr)
        return None


def _pipeline(backend: str, threads: int) -> Any:
    if (backend, threads) not in _pipelines:
        try:
            _pipelines[backend, threads] = _build(backend, threads)
        except RuntimeError as error:
            raise PackError(f"DALI could not set up its {backend} pipeline: {_reason(error)}; "
                            "--backend pil packs without DALI") from None
    return _pipelines[backend, threads]


def _run(pipe: Any, jobs: list[_Job], backend: str) -> list[np.ndarray]:
    pipe.feed_input("encoded", [np.frombuffer(job.data, np.uint8) for job in jobs])
    pipe.feed_input("size", [np.array(job.geometry.scaled[::-1], np.float32) for job in jobs])  # DALI: (H, W)
    pipe.feed_input("anchor", [-np.array(job.geometry.offset[::-1], np.float32) for job in jobs])
    pipe.feed_input("shape", [np.array(job.geometry.canvas[::-1], np.float32) for job in jobs])
    (images,) = pipe.run()
    if backend == "dali-gpu":
        images = images.as_cpu()
    return [np.array(images.at(i)) for i in range(len(jobs))]


# nvJPEG ("mixed") upsamples chroma the fast way by default, libjpeg-turbo (the CPU decoder, PIL) the fancy
# (smooth) way: on 4:2:0 JPEGs that differs by up to 32/255 at colour edges (DALI issue #3610; PR #4662
# added this option to match the CPU path). The CPU decoder accepts and ignores it. Shared with the
# trainer's DALI loader, so its GPU decode gives the RGB that pack and the torch loader give.
DECODER = {"jpeg_fancy_upsampling": True}


def _build(backend: str, threads: int) -> Any:
    """The pipeline: encoded bytes + per-sample size, crop anchor and canvas in; uint8 HWC RGB out.

    On GPU 0 (the first of CUDA_VISIBLE_DEVICES) in every worker process: a pool's worker process has no index
    to pick a device by, and spreading by process id would load the GPUs unevenly. (Whether one GPU keeps up
    with the CPU work of 16 processes, about 600 images/s each here, is not measured: no GPU was lent.)"""
    from nvidia.dali import fn, pipeline_def, types

    gpu = backend == "dali-gpu"

    @pipeline_def(batch_size=MAX_BATCH, num_threads=threads, device_id=0 if gpu else None, exec_async=False,
                  exec_pipelined=False, prefetch_queue_depth=1)
    def resize_pipeline() -> Any:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        size, anchor, shape = (fn.external_source(name=name, dtype=types.FLOAT) for name in ("size", "anchor", "shape"))
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB, **DECODER)
        images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
        return fn.slice(images, anchor, shape, axes=[0, 1], normalized_anchor=False, normalized_shape=False,
                        out_of_bounds_policy="pad", fill_values=0)

    pipe = resize_pipeline()
    pipe.build()
    return pipe


def _reason(error: RuntimeError) -> str:
    """The first line of what DALI 'encountered' (the decoder's own message), else its last line."""
    text = str(error)
    lines = [line.strip() for line in (text.partition("encountered:")[2] or text).splitlines() if line.strip()]
    return lines[0] if lines else "undecodable"


def _finish(job: _Job, pixels: np.ndarray | None, spec: pil.OutputSpec) -> Item:
    item = job.item
    if pixels is None:  # DALI failed on the batch
        return pil.process(item.with_(data=job.data, path=None), spec)
    encoded, written = (job.data, Image.fromarray(pixels)) if job.keep else _encode(pixels, spec)
    meta = {**item.meta, "width": written.width, "height": written.height}
    return item.with_(data=encoded, path=None, raw_shape=None, ext=spec.encode, meta=meta, stats=_stats(written))


def _encode(pixels: np.ndarray, spec: pil.OutputSpec) -> tuple[bytes, Image.Image]:
    """(bytes, what a reader decodes from them): JPEG is lossy, so the stats come from a decode, as in pil.py.

    PIL's encoder, as the PIL path: the same pixels give the same bytes. simplejpeg's encode_jpeg is 1.6x
    faster (200 vs 320 us at 256x341) but its libjpeg-turbo build writes other pixels (mean difference
    0.5 per channel), which would make the two backends' outputs differ by more than their resizes do.
    The decode is simplejpeg's (PIL's pixels, 2x faster) into RGBX, which PIL maps without copying it.
    """
    image = Image.fromarray(pixels)
    data = pil.encode(image, spec)
    if spec.encode != "jpg":
        return data, image  # lossless: what a reader decodes is what was encoded
    decoded = simplejpeg.decode_jpeg(data, colorspace="RGBX")
    return data, Image.frombuffer("RGBX", (decoded.shape[1], decoded.shape[0]), decoded, "raw", "RGBX", 0, 1)


def _stats(image: Image.Image) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """Per channel the sum and the sum of squares of an RGB (or RGBX) image, and its pixel count: from PIL's
    histogram (one pass in C, as pil.py's ImageStat), exact integers as floats; 12x faster than the int64
    squares of every pixel it replaces (0.51 vs 6.5 ms for a 400x533 image here: the passthrough finish in
    benchmarks/results/dali_cpu_work.json)."""
    counts = np.array(image.histogram()[:768], np.int64).reshape(3, 256)
    return (tuple(map(float, counts @ _LEVELS)), tuple(map(float, counts @ (_LEVELS * _LEVELS))),
            image.width * image.height)
