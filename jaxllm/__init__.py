"""jaxllm: train decoder LLMs end to end in JAX."""
