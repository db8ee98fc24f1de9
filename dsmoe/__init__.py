"""dsmoe: train DeepSeek-style Mixture-of-Experts language models on raw torch.distributed."""
__version__ = "0.1.0"
