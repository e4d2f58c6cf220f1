"""Import every model family so that its ``@register_model`` decorators run."""

from . import efficientnet_lite, minilm, openclip, siglip, torchvision_cnn  # noqa: F401
