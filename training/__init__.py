"""Models, data and training: the first stage of the pipeline."""

from training.checkpoints import MissingCheckpointError, checkpoint_path, load_trained
from training.registry import ModelSpec, create_model, get_spec, list_models, register_model

__all__ = [
    "MissingCheckpointError",
    "ModelSpec",
    "checkpoint_path",
    "create_model",
    "get_spec",
    "list_models",
    "load_trained",
    "register_model",
]
