"""transfer: honest, comparable transfer-learning experiments on causal language models."""

__version__ = "0.1.0"
