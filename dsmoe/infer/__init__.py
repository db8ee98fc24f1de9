"""Inference: a KV cache (MLA's compressed latent, GQA's keys and values), prefill then one token at a
time, sampling, batching of prompts of different lengths (dsmoe.infer.engine). The HTTP server
(dsmoe.infer.server) imports FastAPI and is not imported here."""
from dsmoe.infer.engine import Batch, Sequence, generate, generate_ids
from dsmoe.infer.sampling import SamplingParams

__all__ = ["Batch", "Sequence", "SamplingParams", "generate", "generate_ids"]
