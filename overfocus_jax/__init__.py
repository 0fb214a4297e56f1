"""overfocus-jax: CNNs that do not overfocus, in JAX/Flax."""

from overfocus_jax import host_memory as _host_memory

__version__ = "0.2.0"

_host_memory.apply()  # before JAX's first computation: XLA:CPU's per-step block stays mapped (host_memory.py)
