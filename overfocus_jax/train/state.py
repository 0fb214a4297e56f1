"""The train state: every array a run needs to continue exactly, as one pytree (checkpointed whole)."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from overfocus_jax.challenge import NONE, Regularizer
from overfocus_jax.models import Model


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps taken
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array           # uint32[2]: split each step for the regularizer's random choices
  regularizer_state: Any   # the regularizer's own state (regularizer.init; e.g. SGDrop's EMA teacher); () if none

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def initial_variables(model: Model, seed: int, input_shape: tuple[int, ...]) -> dict:
  """The model's fresh variables for ``seed``, as :func:`create_train_state` draws them."""
  init_key, _ = jax.random.split(jax.random.PRNGKey(seed))
  return model.init(init_key, input_shape)


def create_train_state(model: Model, tx: optax.GradientTransformation, *, seed: int, input_shape: tuple[int, ...],
                       regularizer: Regularizer = NONE, variables: dict | None = None) -> TrainState:
  """Fresh variables from ``seed`` (or ``variables``: e.g. pretrained ones), the optimizer's and the regularizer's
  initial states, step 0."""
  _, train_key = jax.random.split(jax.random.PRNGKey(seed))
  variables = initial_variables(model, seed, input_shape) if variables is None else variables
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rng=train_key,
                    regularizer_state=regularizer.init({"params": params, "batch_stats": batch_stats}))
