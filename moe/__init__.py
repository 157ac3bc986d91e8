"""floe: Arctic-style dense-residual Mixture-of-Experts language models."""
__version__ = "0.1.0"
