"""Which image decoder the torch loader should use: speed and pixels of each candidate, on the same bytes.

    python -m benchmarks.decode [--data SHARDS] [--images 1500] [--repeats 5] [--json]

torchvision's image decoding is deprecated since 0.29 (in favour of TorchCodec). Each row decodes the same
encoded images into the uint8 3 x H x W tensor our transform takes, in one process at one torch thread (as
in a DataLoader worker), and then, in a second column, also runs the loader's training transform
(RandomResizedCrop 224 + flip) on it, since a decoder that hands back a strided view can make the resize
slower. Rows take turns, --repeats rounds; images/s is the median with min/median/max in the JSON.

- torchvision: torchvision.io.decode_image(mode=RGB), the loader's decoder until now.
- torchcodec: torchcodec.decoders.decode_image(mode="RGB"), its named successor (a row only where it is
  installed: `pip install torchcodec==0.17.0`; not a dependency of ours).
- pil: Image.open().convert("RGB") -> numpy -> CHW view (Pillow's libjpeg-turbo).
- simplejpeg: simplejpeg.decode_jpeg(colorspace="RGB") -> CHW view (libjpeg-turbo's TurboJPEG API); JPEG only.
- loader: what the torch loader now calls (trainer.data.torch.decode_bytes): simplejpeg for YCbCr and
  gray JPEGs after a header check, Pillow for everything else.

Formats: the shards' JPEGs (clothing-small at shorter:256, the loader benchmark's data) and the same
images as PNG (what pixel-CSV packs hold). "identical" counts images whose pixels equal torchvision's.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

from benchmarks.common import emit, rel, row, summary



def decoders() -> tuple[dict[str, Callable[[bytes], Any]], list[str]]:
    """name -> bytes -> uint8 CHW tensor, for every candidate importable here; and notes on the others."""
    import numpy as np
    import torch
    from PIL import Image

    found: dict[str, Callable[[bytes], Any]] = {}
    notes = []

    def as_tensor(data: bytes) -> Any:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    found["torchvision"] = lambda data: tv_decode(as_tensor(data), mode=ImageReadMode.RGB)
    try:
        from torchcodec.decoders import decode_image as tc_decode

        found["torchcodec"] = lambda data: tc_decode(as_tensor(data), mode="RGB")
    except ImportError as error:
        notes.append(f"torchcodec: not measured ({error})")
    found["pil"] = lambda data: torch.from_numpy(
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
    import simplejpeg

    found["simplejpeg"] = lambda data: torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")).permute(2, 0, 1)
    from trainer.data.torch import decode_bytes

    found["loader"] = decode_bytes
    return found, notes


def encoded_images(shards: Any, count: int) -> dict[str, list[bytes]]:
    """The first COUNT training JPEGs of SHARDS, and the same pixels as PNG."""
    from PIL import Image

    from benchmarks.common import train_members

    jpegs = []
    for _, data, _ in train_members(shards):
        jpegs.append(data)
        if len(jpegs) == count:
            break
    pngs = []
    for data in jpegs:
        out = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(out, "PNG")
        pngs.append(out.getvalue())
    return {"jpeg": jpegs, "png": pngs}


def rate(decode: Callable[[bytes], Any], images: list[bytes], then: Callable[[Any], Any] | None) -> float:
    start = time.perf_counter()
    for data in images:
        image = decode(data)
        if then is not None:
            then(image)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="packed shards [clothing-small at shorter:256, packed once]")
    parser.add_argument("--images", type=int, default=1500, help="images per format")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (rows take turns)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import random
    from pathlib import Path

    import torch

    from benchmarks.common import default_data
    from trainer.data import LoaderSpec
    from trainer.data.torch import transform

    torch.set_num_threads(1)
    shards = Path(args.data) if args.data else default_data()
    formats = encoded_images(shards, args.images)
    found, notes = decoders()
    spec = LoaderSpec(shards=(), batch_size=64, image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3, train=True)
    rng = random.Random(0)

    def crop(image: Any) -> Any:
        return transform(image, spec, rng)

    results = []
    for fmt, images in formats.items():
        names = [n for n in found if not (n == "simplejpeg" and fmt != "jpeg")]
        reference = [found["torchvision"](data) for data in images]
        decode_rates: dict[str, list[float]] = {n: [] for n in names}
        crop_rates: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.repeats):
            for name in names:
                decode_rates[name].append(rate(found[name], images, None))
                crop_rates[name].append(rate(found[name], images, crop))
        for name in names:
            identical = sum(torch.equal(found[name](data), ref) for data, ref in zip(images, reference))
            results.append(row(f"{name}-{fmt}", decode_rates[name], decoder=name, format=fmt,
                               decode_crop_img_s=statistics.median(crop_rates[name]),
                               decode_crop_img_s_stats=summary(crop_rates[name]),
                               identical=f"{identical}/{len(images)}"))
        base = next(r for r in results if r["name"] == f"torchvision-{fmt}")
        for result in results:
            if result["format"] == fmt:
                result["vs_torchvision"] = round(result["img_s"] / base["img_s"], 3)
                result["crop_vs_torchvision"] = round(result["decode_crop_img_s"] / base["decode_crop_img_s"], 3)
    settings = {"data": rel(shards), "images_per_format": args.images, "repeats": args.repeats, "torch_threads": 1,
                "transform": "RandomResizedCrop 224 + flip (trainer.data.torch.transform)"}
    emit("decode", settings, results, ["name", "img_s", "vs_torchvision", "decode_crop_img_s", "crop_vs_torchvision",
                                        "identical"], args.json, notes)


if __name__ == "__main__":
    main()
