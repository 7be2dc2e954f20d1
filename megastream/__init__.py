"""megastream: fine-tune large language models on one GPU by streaming layers from host RAM."""

__version__ = "0.1.0"
