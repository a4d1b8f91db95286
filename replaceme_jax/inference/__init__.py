"""Generation from a (pruned or dense) model: KV-cache decoding, sampling, stop handling."""
from replaceme_jax.inference.generator import GenerationResult, Generator
from replaceme_jax.inference.sampling import SamplingParams

__all__ = ["Generator", "GenerationResult", "SamplingParams"]
