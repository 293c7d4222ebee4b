"""Kernel tests run real kernels (User-Mode-Linux nodes; the lab/ package)."""
