"""overfocus-jax: CNNs that do not overfocus, in JAX/Flax."""

__version__ = "0.2.0"
