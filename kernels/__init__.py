"""Pallas kernels, each beside a plain-jnp reference and a dispatch by backend."""
