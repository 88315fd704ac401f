"""Pallas kernels of jaxengine, each beside a pure-jnp reference with the same signature."""
