"""The notebook layer: what the numbered notebooks call.

:mod:`.parameters` declares the parameters every notebook shares; :mod:`.context` opens the
catalog and resolves the models (:func:`prepare_from`, :class:`RunContext`); :mod:`.prose` turns
results into tables, sentences and saved figures. (The fine-tuning study's own prose is in
:mod:`vrec_utils.studies.finetune_study`.)"""

from .context import (
    RunContext,
    label_overview,
    open_catalog,
    prepare,
    prepare_from,
    training_split,
)
from .parameters import NotebookParameters

__all__ = ["NotebookParameters", "RunContext", "label_overview", "open_catalog", "prepare", "prepare_from", "training_split"]
