"""jaxlab: functional Flax NNX research models on Pallas kernels."""

__version__ = "0.1.0"
