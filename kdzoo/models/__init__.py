"""Model zoo, registry, feature taps and checkpoint loading."""

# The zoo packages register their models on import (the registry stays complete for every importer).
from kdzoo.models import cifar, detection, imagenet, segmentation  # noqa: F401
from kdzoo.models.checkpoint import identify_architecture, load_checkpoint
from kdzoo.models.registry import count_parameters, create_model, list_models, register_model
from kdzoo.models.taps import FeatureExtractor, Outputs, Tap, TapSpec, features

__all__ = [
    "FeatureExtractor",
    "Outputs",
    "Tap",
    "TapSpec",
    "count_parameters",
    "create_model",
    "features",
    "identify_architecture",
    "list_models",
    "load_checkpoint",
    "register_model",
]
