"""poelm: Product-of-Experts local-learning language models and their backprop controls."""
__version__ = "0.1.0"
