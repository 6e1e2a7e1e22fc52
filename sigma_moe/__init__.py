"""sigma-moe: pretraining very sparse Mixture-of-Experts LMs with Rho-1 token selection."""

__version__ = "0.1.0"

from sigma_moe import (
    _malloc,  # noqa: F401,E402  (glibc keeps freed memory: no per-step faults)
    _threads,  # noqa: F401,E402  (OpenMP env, before torch is imported)
)
