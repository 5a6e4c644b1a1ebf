"""DSpark: distributed LLM serving with lossless, confidence-scheduled speculative decoding."""

from dspark import omp as _omp

# OpenMP reads its wait policy when torch loads its runtime, so it is set here, before anything
# imports torch: sleeping waits unless a command that owns its cores chooses spinning before
# it imports torch (see dspark/omp.py for the measurements behind both).
try:
    _omp.configure("passive")
except ValueError:  # a bad DSPARK_OMP_WAIT: the command that reads it reports it
    pass

__version__ = "0.1.0"
