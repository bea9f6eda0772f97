"""Pallas kernels with plain-JAX references; each kernel lives in its own subpackage.

Layout per kernel: ``reference.py`` (the specification), ``tpu.py`` / ``gpu.py`` (Pallas
kernels) and ``ops.py`` (public entry point). This package imports only jax.
"""
