"""Embedding models behind one interface (:class:`Embedder`) and a registry."""

from .base import Embedder, ModelUnavailableError, TextNotSupportedError
from .registry import create_embedder, get_model_entry, list_models, register_model, resolve_device

__all__ = [
    "Embedder",
    "ModelUnavailableError",
    "TextNotSupportedError",
    "create_embedder",
    "get_model_entry",
    "list_models",
    "register_model",
    "resolve_device",
]
