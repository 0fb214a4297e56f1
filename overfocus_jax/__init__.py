"""overfocus-jax: CNNs that do not overfocus, in JAX/Flax.

``import overfocus_jax as ofx`` gives the functional API, a flat namespace like optax's:

- regularizers (optax-style ``init``/``apply`` pairs for the latent map): :func:`sgdrop`, :func:`rsc`,
  :func:`rsc_domainbed`, :func:`chain`, :func:`stateless`, :func:`identity`, :class:`Regularizer`,
  :class:`TeacherInputs`;
- the masks they apply, as pure functions that return them: :func:`sgdrop_mask`, :func:`rsc_mask`,
  :func:`rsc_domainbed_mask`, and the rules underneath: :func:`drop_mask`, :func:`quantile_mask`,
  :func:`mass_drop_mask`;
- attributions: :func:`gradient_times_activation` and :func:`latent_attribution` (the latent map's, through the
  head), :func:`grad_cam`, :func:`input_gradient`, :func:`smoothgrad`, :func:`integrated_gradients`, and Grad-CAM at
  any layer (:func:`layer_grad_cam` with :func:`linen_probe` or :func:`nnx_probe`; :func:`linen_feature_layers`,
  :func:`nnx_feature_layers` list the layers); how concentrated a map is: :func:`attribution_ratio`,
  :func:`entropy`, :func:`normalised_entropy`, :func:`gini`;
- any model's two halves as plain functions: :func:`linen_fns`, :func:`nnx_fns`;
- data parallelism over every device: :func:`make_mesh`, :func:`replicated`, :func:`data_sharded`,
  :func:`shard_batch`, :func:`replicate`, :data:`DATA_AXIS`;
- :func:`retain_host_memory`, the one process-wide setting the ``overfocus`` CLI makes on a CPU, for scripts that
  want it too.

Everything else in the package is internal and may change. Importing the package changes no process-wide setting
and compiles nothing; names are imported when first used.
"""

import importlib

__version__ = "0.5.0"

# public name -> the module that defines it
_SOURCES = {
    **dict.fromkeys(("Regularizer", "TeacherInputs", "chain", "stateless", "identity"),
                    "overfocus_jax.challenge.base"),
    **dict.fromkeys(("sgdrop", "sgdrop_mask"), "overfocus_jax.challenge.sgdrop"),
    **dict.fromkeys(("rsc", "rsc_mask", "rsc_domainbed", "rsc_domainbed_mask"), "overfocus_jax.challenge.rsc"),
    **dict.fromkeys(("drop_mask", "quantile_mask", "mass_drop_mask"), "overfocus_jax.challenge.masks"),
    **dict.fromkeys(("gradient_times_activation", "latent_attribution"), "overfocus_jax.challenge.attribution"),
    **dict.fromkeys(("attribution_ratio", "entropy", "normalised_entropy", "gini"),
                    "overfocus_jax.challenge.concentration"),
    **dict.fromkeys(("grad_cam", "input_gradient", "smoothgrad", "integrated_gradients"),
                    "overfocus_jax.explain.attributions"),
    **dict.fromkeys(("layer_grad_cam", "layer_activation", "linen_probe", "nnx_probe", "linen_feature_layers",
                     "nnx_feature_layers"), "overfocus_jax.explain.layers"),
    **dict.fromkeys(("linen_fns", "nnx_fns"), "overfocus_jax.models.adapters"),
    **dict.fromkeys(("make_mesh", "replicated", "data_sharded", "shard_batch", "replicate", "DATA_AXIS"),
                    "overfocus_jax.parallel"),
    "retain_host_memory": "overfocus_jax.host_memory",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str):
  if name not in _SOURCES:
    raise AttributeError(f"module 'overfocus_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_SOURCES[name]), name)
  globals()[name] = value  # the next access is a plain lookup
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
