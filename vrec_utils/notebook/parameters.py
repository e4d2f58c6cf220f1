"""The parameters every numbered notebook shares, declared once.

A notebook's parameters cell starts with ``from vrec_utils.notebook.parameters import *``, which
defines these names with their defaults, then adds its own; papermill (``vrec report``) injects
new values in a cell below, as for any parameter. The notebook then calls
``notebook.prepare(NotebookParameters.from_namespace(globals()))``.

Paths are relative to ``notebooks/`` (the folder a notebook runs in).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class NotebookParameters:
    catalog: str | None = None  # catalog folder or CSV; None means the bundled sample (data/sample)
    profile: str = "offline"  # offline | article | smoke
    models: list[str] | None = None  # explicit model names instead of the profile's (vrec report passes the resolved list)
    weights: dict[str, str] | None = None  # local weights per model, e.g. {"siglip-base": "/path/dir"} (vrec report --weights)
    profile_notes: list[str] = field(default_factory=list)  # notes to show at the top (e.g. that the profile fell back)
    fallback: bool = True  # fall back to the offline profile when the profile's weights are missing
    sample_size: int | None = None  # a seeded sample of this many items instead of the whole catalog
    workdir: str = "../work"  # embedding cache, indexes and fine-tuned models
    figures_dir: str = "../figures"
    tables_dir: str = "../reports/tables"
    k: int = 5  # results per query
    label_column: str = "articleType"  # the label that decides hits and relevance
    interactions: str | None = None  # interaction log CSV (query_id,item_id[,weight]); notebook 08 sets its nDCG@5 difference beside the labels
    filter_column: str = "subCategory"  # the category of the filtered kNN (the label column when the catalog lacks it)
    seed: int = 0
    progress: bool = True  # progress bars (vrec report turns them off so that the HTML keeps none)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any]) -> NotebookParameters:
        """The common parameters' current values in a notebook's namespace (``globals()``)."""
        return cls(**{name: namespace[name] for name in cls.names() if name in namespace})


# The names a parameters cell gets from ``import *``, with their defaults.
_DEFAULTS = asdict(NotebookParameters())
globals().update(_DEFAULTS)
__all__ = list(_DEFAULTS)
