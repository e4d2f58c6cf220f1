"""The notebook layer: what the numbered notebooks call (:mod:`.context`: :func:`prepare`,
:class:`RunContext`, :func:`open_catalog`). Prose and tables for notebooks live in
:mod:`vrec_utils.report` (and the fine-tuning study's in :mod:`vrec_utils.studies.finetune_study`)."""

from .context import RunContext, label_overview, open_catalog, prepare, training_split

__all__ = ["RunContext", "label_overview", "open_catalog", "prepare", "training_split"]
