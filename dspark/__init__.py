"""DSpark: distributed LLM serving with lossless, confidence-scheduled speculative decoding."""

import os as _os

# OpenMP worker threads that spin while waiting turn catastrophic as soon as another process
# competes for the cores (measured on a 2-core host: a bf16 decode step went from 45 ms to
# 1.2 s).  A serving node always runs several processes (verifier ranks, draft workers, router),
# so threads sleep instead of spinning unless the operator chose otherwise.  This must happen
# before torch loads its OpenMP runtime, hence here.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
