"""The decision report: should a shop switch its "similar items" from a CNN to a vision-language
model, at what cost, and how to test it online. Computed from cached embeddings only (no
re-extraction), seeded, every table a DataFrame written as ``decision_<name>.csv``.

Map (each module imports only those above it; all sit above :mod:`vrec_utils.evaluation`):

* ``data``: :class:`DecisionData`, the models' vectors over the shared candidates, relevance,
  queries, and the leave-one-out search (the query is never its own result).
* ``compression`` (part 1): PCA / truncation / int8 / int4 / PQ / binary (+ float re-rank)
  variants, bytes per item, latency, the Pareto front.
* ``fidelity`` (part 2): HNSW ``ef_search`` and IVF ``nprobe`` sweeps through the FAISS backend,
  filtered and not, recall@k against exact, Elasticsearch 9.1+'s default quantisation emulated.
* ``es_server`` (part 2, measured): with a server (VREC_ES_URL), each model indexed as hnsw /
  int8_hnsw / bbq_hnsw / the server's default, ``num_candidates`` swept, beside the emulated rows.
* ``filtering`` (part 3): the share of recommendations outside the query's category, and what
  the filter adds, with paired CIs.
* ``categories`` (part 4): per-category paired differences, Holm or Benjamini-Hochberg.
* ``power`` (part 5): A/B sample size and days (statsmodels), every assumption returned.
* ``protocols`` (part 6): Marqo's KAGL text-to-image and category-to-product, MIEB-style
  image-to-image Recall@1.
* ``interactions`` (part 7): the paired nDCG@5 difference against an interaction log.
* ``verdict`` (part 7): the sentences, computed from the tables.
* ``run``: :func:`run_decision`, all of it in one call (the notebook ``08_decision`` and
  ``vrec decide``).
"""

from .data import DecisionData, decision_data, load_decision_data
from .power import ABPlan
from .run import (
    DecisionParams,
    DecisionReport,
    embedding_throughput,
    run_decision,
    write_tables,
)

__all__ = [
    "ABPlan", "DecisionData", "DecisionParams", "DecisionReport", "decision_data", "embedding_throughput", "load_decision_data",
    "run_decision", "write_tables",
]
