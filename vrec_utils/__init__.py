"""vrec: a research workbench for visual product recommendation."""

__version__ = "0.1.0"
