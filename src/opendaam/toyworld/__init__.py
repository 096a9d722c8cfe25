"""toy-urban: a procedural urban world with exact masks, and the small diffusion model trained on it."""

from opendaam.toyworld.scene import (
    CLASSES,
    LABEL_IDS,
    LABEL_NAMES,
    LOOKALIKE_CLASSES,
    Scene,
    WorldConfig,
    caption_for,
    class_mask,
    colorize_labels,
    render_scene,
    template_caption,
)

__all__ = [
    "CLASSES",
    "LABEL_IDS",
    "LABEL_NAMES",
    "LOOKALIKE_CLASSES",
    "Scene",
    "WorldConfig",
    "caption_for",
    "class_mask",
    "colorize_labels",
    "render_scene",
    "template_caption",
]
