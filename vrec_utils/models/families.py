"""Import every model family so that its ``@register_model`` decorators run (imported once by
``vrec_utils.models``; the registry itself imports no family)."""

from . import efficientnet_lite, minilm, openclip, siglip, torchvision_cnn  # noqa: F401
from . import mini_siglip, local  # noqa: F401,E402  (after the towers: mini-siglip builds on efficientnet-lite0 + minilm)
