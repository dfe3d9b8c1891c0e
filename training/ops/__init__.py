"""Torch custom ops (each with a fake kernel and an explicit backward) used by the models."""

from training.ops.crop_zoom import crop_zoom, crop_zoom_reference, zoom_grid

__all__ = ["crop_zoom", "crop_zoom_reference", "zoom_grid"]
