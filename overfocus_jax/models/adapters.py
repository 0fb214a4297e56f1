"""Any model as the library needs it: two functions for the masks and attributions, one object for the train step.

The masks, regularizers and attributions take a model's two halves in inference mode, as plain callables::

    encode_fn(x) -> z             (B, H, W, C): the latent map the regularizers mask
    classify_fn(z) -> logits      (B, K): the head, differentiated by jax.vjp

Plain functions need no adapter. :func:`linen_fns` gives them for a Flax Linen module with ``encode`` and
``classify`` methods (their ``train`` keyword, if they take one, set to False), :func:`nnx_fns` for a Flax NNX module
(run on a copy in evaluation mode: ``nnx.view``; the module itself is left as it is).

The train step (:func:`overfocus_jax.train.step.make_train_step`, the ``overfocus`` CLI) needs more: a model it can
run in training mode over explicit variables. Its interface, which :class:`overfocus_jax.models.Model` (Linen) and
:class:`NNXModel` implement::

    variables = model.init(key, input_shape)                  # {"params": ..., "batch_stats": ...}
    z, state = model.encode(variables, x, train=..., rng=None)
    logits, state = model.classify(variables, z, train=..., rng=None)
    logits, state = model.apply(variables, x, train=..., rng=None)    # == classify(encode(x))
    encode, classify = model.split("latent")                  # the pair at a split point
    model.supports_split(level), model.has(method_name), model.name
    encode_fn, classify_fn = model.inference_fns(variables)

``state`` is ``{"batch_stats": ...}``: the statistics (and, for NNX, any other non-parameter state) the call
updated in training, ``{}`` in inference; the step merges it into the variables.
"""

import inspect
from typing import Any, Callable

import flax.linen as nn
import jax

Variables = dict[str, Any]


def takes_train(method: Callable) -> bool:
  """Whether ``method`` accepts a ``train`` keyword (by name or through ``**kwargs``)."""
  try:
    parameters = inspect.signature(method).parameters
  except (TypeError, ValueError):
    return True
  return "train" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _method(owner, name: str, what: str) -> Callable:
  method = getattr(owner, name, None)
  if not callable(method):
    raise ValueError(f"the {what} has no method {name!r}; give it {name}(...) or pass {name}=<method name>")
  return method


def linen_fns(module: nn.Module, variables: Variables, *, encode: str = "encode",
              classify: str = "classify") -> tuple[Callable, Callable]:
  """``(encode_fn, classify_fn)`` of a Linen module with ``variables``, in inference mode.

  ``encode`` and ``classify`` name the module's methods for the two halves; a method that takes ``train`` gets
  ``train=False``.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, overfocus_jax as ofx
    >>> class Net(nn.Module):
    ...   def setup(self):
    ...     self.conv, self.dense = nn.Conv(4, (3, 3)), nn.Dense(10)
    ...   def encode(self, x):
    ...     return nn.relu(self.conv(x))
    ...   def classify(self, z):
    ...     return self.dense(z.mean(axis=(1, 2)))
    ...   def __call__(self, x):
    ...     return self.classify(self.encode(x))
    >>> net = Net()
    >>> variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
    >>> encode_fn, classify_fn = ofx.linen_fns(net, variables)
    >>> classify_fn(encode_fn(jnp.zeros((2, 8, 8, 1)))).shape
    (2, 10)
  """
  fns = []
  for name in (encode, classify):
    method = _method(module, name, "Linen module")
    kwargs = {"train": False} if takes_train(method) else {}
    fns.append(lambda inputs, method=method, kwargs=kwargs: module.apply(variables, inputs, method=method, **kwargs))
  return fns[0], fns[1]


def nnx_fns(model, *, encode: str = "encode", classify: str = "classify") -> tuple[Callable, Callable]:
  """``(encode_fn, classify_fn)`` of an NNX module, in evaluation mode (``nnx.view`` with ``deterministic`` and
  ``use_running_average``: a copy, so ``model`` stays in the mode it is in).

  Examples:
    >>> from flax import nnx
    >>> import jax.numpy as jnp, overfocus_jax as ofx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.conv, self.dense = nnx.Conv(1, 4, (3, 3), rngs=rngs), nnx.Linear(4, 10, rngs=rngs)
    ...   def encode(self, x):
    ...     return nnx.relu(self.conv(x))
    ...   def classify(self, z):
    ...     return self.dense(z.mean(axis=(1, 2)))
    >>> encode_fn, classify_fn = ofx.nnx_fns(Net(nnx.Rngs(0)))
    >>> classify_fn(encode_fn(jnp.zeros((2, 8, 8, 1)))).shape
    (2, 10)
  """
  from flax import nnx
  evaluating = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
  return _method(evaluating, encode, "NNX module"), _method(evaluating, classify, "NNX module")


class NNXModel:
  """An NNX module as a model for the train step (the interface in the module docstring).

  ``variables["params"]`` are the module's ``nnx.Param`` values and ``variables["batch_stats"]`` every other state
  (batch statistics, dropout's RNG counters), both as plain nested dicts, so that optax and orbax see ordinary
  pytrees. Each call merges them into a copy of the module, runs the method in training mode (``module.train()``)
  or evaluation mode (``module.eval()``) and returns the updated non-parameter state. ``init`` returns the module's
  own initial variables: an NNX module is initialised when it is built, from its ``nnx.Rngs`` (``key`` is not used),
  and its dropout draws from those too (``rng`` is not used).
  """

  def __init__(self, module, name: str = "nnx", *, encode: str = "encode", classify: str = "classify"):
    from flax import nnx
    for method in (encode, classify):
      _method(module, method, "NNX module")
    self._nnx = nnx
    self.name = name
    self._methods = {"encode": encode, "classify": classify}
    self._graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    self._templates = (params, rest)
    self._module_type = type(module)

  def init(self, key: jax.Array, input_shape: tuple[int, ...]) -> Variables:
    del key, input_shape
    params, rest = self._templates
    return {"params": self._nnx.to_pure_dict(params), "batch_stats": self._nnx.to_pure_dict(rest)}

  def bind(self, variables: Variables):
    """A copy of the module holding ``variables`` (the model's own module is left as it was)."""
    return self._merged(variables)

  def _merged(self, variables: Variables):
    params, rest = (jax.tree.map(lambda leaf: leaf, template) for template in self._templates)
    self._nnx.replace_by_pure_dict(params, variables["params"])
    self._nnx.replace_by_pure_dict(rest, variables.get("batch_stats", {}))
    return self._nnx.merge(self._graphdef, params, rest)

  def _run(self, method: str, variables: Variables, inputs: jax.Array, train: bool):
    module = self._merged(variables)
    module.train() if train else module.eval()
    out = getattr(module, method)(inputs)
    if not train:
      return out, {}
    _, _, rest = self._nnx.split(module, self._nnx.Param, ...)
    return out, {"batch_stats": self._nnx.to_pure_dict(rest)}

  def encode(self, variables: Variables, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None):
    del rng
    return self._run(self._methods["encode"], variables, x, train)

  def classify(self, variables: Variables, z: jax.Array, *, train: bool = False, rng: jax.Array | None = None):
    del rng
    return self._run(self._methods["classify"], variables, z, train)

  def apply(self, variables: Variables, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None):
    z, state = self.encode(variables, x, train=train, rng=rng)
    if train:
      variables = {**variables, "batch_stats": state["batch_stats"]}
    return self.classify(variables, z, train=train, rng=rng)

  def has(self, name: str) -> bool:
    return callable(getattr(self._module_type, name, None))

  def supports_split(self, level: str) -> bool:
    return level == "latent"

  def split(self, level: str):
    if level != "latent":
      raise ValueError(f"an NNX model is split at its encode/classify methods only ('latent'), got {level=}")
    return self.encode, self.classify

  def inference_fns(self, variables: Variables) -> tuple[Callable, Callable]:
    return (lambda x: self.encode(variables, x)[0]), (lambda z: self.classify(variables, z)[0])

  # The inspection methods of the library's models: an NNX model has none of them.
  def attention_maps(self, variables, x):
    return None

  def keypoints(self, variables, x):
    return None

  def patch_scales(self, variables, x):
    return None
