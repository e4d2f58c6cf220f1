"""The decision report: should a shop switch its "similar items" from a CNN to a VLM, at what
cost, and how to test it online (issue 14). Computed from cached embeddings only."""
