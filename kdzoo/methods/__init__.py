"""Distillation methods: one file per method, registered with ``@register_method``."""

from kdzoo.methods.base import Batch, DatasetInfo, Distiller, Progress, Stage
from kdzoo.methods.registry import create_distiller, list_methods, method_class, register_method

__all__ = [
    "Batch",
    "DatasetInfo",
    "Distiller",
    "Progress",
    "Stage",
    "create_distiller",
    "list_methods",
    "method_class",
    "register_method",
]
