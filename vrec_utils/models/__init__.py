"""Embedding models behind one interface (:class:`Embedder`) and a registry.

``base`` (the interface) and ``registry`` are leaves; each family module (``siglip``, ``openclip``,
``torchvision_cnn``, ...) registers itself; ``families`` imports them all and this package imports
``families``, so ``create_embedder`` finds every registered name.
"""

from .base import Embedder, ModelUnavailableError, TextNotSupportedError
from .registry import create_embedder, get_model_entry, list_models, register_model, resolve_device

# The families register themselves with the registry on import. The registry is a leaf (it imports
# no family), so the families are imported here, once, by the package.
from . import families  # noqa: E402,F401  (after the registry they register with)

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
