"""sigma-moe: pretraining very sparse Mixture-of-Experts LMs with Rho-1 token selection."""

__version__ = "0.1.0"
