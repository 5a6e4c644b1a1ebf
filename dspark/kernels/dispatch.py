"""Choose between a kernel's torch reference and its Triton version.

Every kernel with a Triton version keeps a torch reference of the same signature; callers use
the dispatching function and never pick a backend themselves.  The choice:

  * ``DSPARK_KERNELS=torch`` forces the reference everywhere;
  * ``DSPARK_KERNELS=triton`` forces Triton (an error if Triton is missing; CPU tensors then
    need ``TRITON_INTERPRET=1``, which is how the parity tests run);
  * unset or ``auto``: Triton for CUDA tensors when ``import triton`` works, else the reference.

Triton is imported lazily, so the package imports and the reference runs without it.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["ENV_VAR", "triton_available", "use_triton"]

ENV_VAR = "DSPARK_KERNELS"


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` succeeds (checked once per process)."""
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (no driver, ABI mismatch) counts as missing
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a kernel called on ``tensor`` (its main input) should run the Triton version.

    Example:
        >>> use_triton(torch.zeros(1))  # CPU tensor, DSPARK_KERNELS unset -> the reference
        False
    """
    choice = os.environ.get(ENV_VAR, "auto").strip().lower()
    if choice == "torch":
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton cannot be imported")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{ENV_VAR}=triton on {tensor.device} tensors needs TRITON_INTERPRET=1 "
                "(set before triton is imported)"
            )
        return True
    if choice in ("", "auto"):
        return tensor.is_cuda and triton_available()
    raise ValueError(f"{ENV_VAR} must be torch, triton or auto, got {choice!r}")
