"""Loading a checkpoint for generation lives in dsmoe.infer.load; this name is kept for importers."""
from dsmoe.infer.load import load_model, resolve_checkpoint

__all__ = ["load_model", "resolve_checkpoint"]
