"""Studies: measured experiments that sit above evaluation (they train, search and evaluate).

* :mod:`.finetune_study`: before/after a fine-tune (in-domain, category and photometric shift,
  text queries) for notebook 07 and ``benchmarks/bench_finetune.py``.
"""
