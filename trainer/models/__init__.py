"""Model registry: see registry.py."""

from trainer.models.registry import BACKBONES, Model, create_model, model_from_checkpoint, register_backbone

__all__ = ["BACKBONES", "Model", "create_model", "model_from_checkpoint", "register_backbone"]
