"""Deprecated: import from :mod:`vrec_utils.train` (training) or :mod:`vrec_utils.studies.finetune_study`
(the before/after study). This re-export stays only until no caller imports ``vrec_utils.finetune``."""

import warnings

from .studies.finetune_study import *
from .train import *

warnings.warn(
    "vrec_utils.finetune is deprecated: import from vrec_utils.train or vrec_utils.studies.finetune_study",
    DeprecationWarning,
    stacklevel=2,
)
