"""kdzoo: knowledge distillation for image classification, every well-known method, one trainer."""

from kdzoo.methods import create_distiller, list_methods
from kdzoo.models import create_model, features

__version__ = "0.1.0"

__all__ = ["__version__", "create_distiller", "create_model", "features", "list_methods"]
