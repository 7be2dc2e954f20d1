"""megastream: fine-tune large language models on one GPU by streaming layers from host RAM."""

import os

# Bitwise-reproducible CPU runs (exact resume): MKL may otherwise give a GEMM fewer threads when
# the machine is busy (here: the optimizer thread), and the weight-gradient GEMMs split their long
# token dimension across threads, so the summation order would change. Must precede importing torch.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

__version__ = "0.1.0"
