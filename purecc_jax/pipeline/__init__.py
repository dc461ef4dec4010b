"""FLUX text-to-image pipeline in JAX: tokenizers, text encoding, pipeline folders, sigma schedule and sampler."""
