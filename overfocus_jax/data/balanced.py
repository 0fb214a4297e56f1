r"""Training on environments as DomainBed does: held-out test environments (:func:`training_view`) and
environment-balanced batches — every batch holds the same number of examples of each training environment,
environment after environment.

With ``E`` training environments, ``b = B / E`` examples of each per batch of ``B``, and environment ``e``'s
``n_e`` rows of the training split:

.. math::

    S = \min_e \lfloor n_e / b \rfloor \ \text{steps an epoch}, \qquad
    \pi_{t,e} = \text{epoch } t\text{'s permutation of environment } e\text{'s rows}, \qquad
    \text{batch } s \text{ of epoch } t = [\pi_{t,0}[sb : sb+b],\ \dots,\ \pi_{t,E-1}[sb : sb+b]]

so environment ``e`` fills rows ``[e·b, (e+1)·b)`` of every batch — the layout :mod:`overfocus_jax.challenge.invariance`
reads the environments' risks from. DomainBed draws each environment's minibatch from its own infinite loader
(sampling with replacement); here each epoch is a permutation of every environment (without replacement), cut at
the smallest one, so the larger environments' surplus rows of an epoch wait for a later epoch's order. Like the pooled
stream, the order of epoch ``t`` depends only on the seed and ``t``: the host stream draws it with NumPy
(:func:`epoch_order`), the device stream with the JAX PRNG (:func:`device_epoch_order`).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from overfocus_jax.data import environments, sources
from overfocus_jax.errors import SettingError


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """Which rows of the training split each batch block comes from.

  Attributes:
    rows: for each training environment (block ``i`` of a batch), its rows of the training split.
    ids: each block's environment, an index into the dataset's ``domain_names``.
    per_env: ``b``, examples of each environment per batch.
  """

  rows: tuple[np.ndarray, ...]
  ids: tuple[int, ...]
  per_env: int

  @property
  def batch_size(self) -> int:
    return self.per_env * len(self.rows)

  @property
  def steps_per_epoch(self) -> int:
    return min(len(r) for r in self.rows) // self.per_env

  @property
  def epoch_length(self) -> int:
    """Examples an epoch yields: ``S · B``."""
    return self.steps_per_epoch * self.batch_size


def fitting_batch_size(batch_size: int, environments: int, devices: int = 1) -> int:
  """The batch nearest ``batch_size`` that divides over ``environments`` (a balanced batch) and over ``devices``: a
  multiple of their least common multiple, the larger of the two nearest on a tie; ``batch_size`` itself when it
  fits."""
  unit = math.lcm(max(environments, 1), max(devices, 1))
  below = max(unit, batch_size // unit * unit)
  above = below if batch_size <= below else below + unit
  return below if batch_size - below < above - batch_size else above


def make_layout(domains: np.ndarray, batch_size: int, environment_ids, names=()) -> Layout:
  """The balanced layout of a training split whose example ``i`` is in environment ``domains[i]``, over the
  environments ``environment_ids`` (in that order).

  Raises:
    SettingError: a batch that does not divide over the environments, or an environment with fewer examples than
      its share of one batch.
  """
  ids = tuple(int(i) for i in environment_ids)
  label = lambda i: f"{i} ({names[i]})" if i < len(names) else str(i)
  if batch_size % len(ids):
    raise SettingError("batch_size", f"batch_size={batch_size} does not divide over the {len(ids)} training "
                       f"environments {', '.join(map(label, ids))}",
                       f"a multiple of {len(ids)} (each batch holds the same number of every environment), or "
                       "--config.environments.balanced=False")
  per_env = batch_size // len(ids)
  domains = np.asarray(domains)
  rows = tuple(np.flatnonzero(domains == i) for i in ids)
  for i, env_rows in zip(ids, rows):
    if len(env_rows) < per_env:
      raise SettingError("batch_size", f"training environment {label(i)} has {len(env_rows)} examples, fewer than "
                         f"the {per_env} of it each balanced batch of {batch_size} needs",
                         f"at most {len(env_rows) * len(ids)}, or hold that environment out")
  return Layout(rows=rows, ids=ids, per_env=per_env)


def _arrange(permuted_rows, layout: Layout):
  """Each environment's permuted rows, cut to ``S·b`` and interleaved block by block: ``(S·B,)``."""
  steps, per_env = layout.steps_per_epoch, layout.per_env
  blocks = [rows[:steps * per_env].reshape(steps, per_env) for rows in permuted_rows]
  stack = jnp.stack if isinstance(blocks[0], jax.Array) else np.stack
  return stack(blocks, axis=1).reshape(-1)  # (S, E, b): batch s is row s, environment after environment


def epoch_order(layout: Layout, seed: int, epoch: int) -> np.ndarray:
  """Epoch ``epoch``'s order of the training split's rows, ``(S·B,)``, drawn with NumPy (the host stream)."""
  permuted = []
  for block, rows in enumerate(layout.rows):
    rng = np.random.default_rng((seed, epoch, block))
    permuted.append(rows[rng.permutation(len(rows))])
  return _arrange(permuted, layout)


def device_epoch_order(layout: Layout, shuffle_key: jax.Array, epoch: jax.Array) -> jax.Array:
  """Epoch ``epoch``'s order, ``(S·B,)``, drawn with the JAX PRNG inside a compiled program (the device stream)."""
  key = jax.random.fold_in(shuffle_key, epoch)
  permuted = [jnp.asarray(rows, jnp.int32)[jax.random.permutation(jax.random.fold_in(key, block), len(rows))]
              for block, rows in enumerate(layout.rows)]
  return _arrange(permuted, layout)


class BalancedRecords:
  """The training split read in balanced order, epoch after epoch: a random-access source for grain, record ``i``
  being row ``epoch_order(epoch)[i mod S·B]`` of ``source`` with ``epoch = i // (S·B)``."""

  EPOCHS = 1 << 20  # "endless": grain needs a length; a million epochs of any batch outlast every run

  def __init__(self, source, layout: Layout, seed: int):
    self.source, self.layout, self.seed = source, layout, seed
    self._cached = (None, None)  # (epoch, its order): grain's threads read one epoch at a time

  def __len__(self) -> int:
    return self.layout.epoch_length * self.EPOCHS

  def order(self, epoch: int) -> np.ndarray:
    cached_epoch, order = self._cached
    if cached_epoch != epoch:
      order = epoch_order(self.layout, self.seed, epoch)
      self._cached = (epoch, order)  # one tuple assignment: a reading thread sees an old or a new pair, never half
    return order

  def __getitem__(self, index: int):
    epoch, position = divmod(int(index), self.layout.epoch_length)
    return self.source[int(self.order(epoch)[position])]


def _environment_list(dataset, envs, field: str) -> tuple[int, ...]:
  """``envs`` as a sorted tuple of ``dataset``'s environment indices (``field`` names the config field)."""
  names = tuple(getattr(dataset, 'domain_names', ()))
  envs = tuple(int(i) for i in envs)
  if not envs:
    return ()
  if not names:
    raise SettingError(field, f'{field}={envs}: dataset {dataset.name!r} has no environments',
                       f'leave {field} empty, or use {environments.SYNTAX} or imagefolder:DIR:domains')
  listed = ', '.join(f'{i} ({n})' for i, n in enumerate(names))
  for index in envs:
    if not 0 <= index < len(names):
      raise SettingError(field, f'{field}={envs}: dataset {dataset.name!r} has no environment {index}',
                         f'use some of {listed}')
  if len(set(envs)) != len(envs):
    raise SettingError(field, f'{field}={envs} names an environment twice', 'name each environment once')
  return tuple(sorted(envs))


def check_environments(dataset, test_envs=(), train_envs=()) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(test_envs, train_envs)`` checked against ``dataset``'s environments; ``train_envs`` () means every
  environment not held out.

  Raises:
    SettingError: environments for a dataset without any, an index that is not one of them, a repeated one, an
      environment both held out and trained on, or none left to train on.
  """
  test_envs = _environment_list(dataset, test_envs, 'environments.test_envs')
  explicit = _environment_list(dataset, train_envs, 'environments.train_envs')
  if not test_envs and not explicit:
    return (), ()
  names = dataset.domain_names
  both = sorted(set(test_envs) & set(explicit))
  if both:
    raise SettingError('environments.train_envs', f'environment {both[0]} ({names[both[0]]}) is both a test '
                       f'environment (environments.test_envs={test_envs}) and a training one '
                       f'(environments.train_envs={explicit})', 'list each environment in one of the two')
  train = explicit or tuple(i for i in range(len(names)) if i not in test_envs)
  if not train:
    raise SettingError('environments.test_envs', f'environments.test_envs={test_envs} holds out every environment '
                       f'of {dataset.name!r}, leaving none to train on', 'hold out fewer environments')
  return test_envs, train


def has_environments(dataset) -> bool:
  """Whether every example of both splits knows its environment."""
  return bool(getattr(dataset, 'domain_names', ())) and all(
      getattr(s, 'domains', None) is not None for s in (dataset.train, dataset.test))


def training_view(dataset, test_envs=(), train_envs=()):
  """The dataset a domain-generalization run trains and reports on, DomainBed's way:

  * ``train``: the in-splits of the training environments (``train_envs``, by default every environment not in
    ``test_envs``);
  * ``test``: the in-splits of the ``test_envs`` (DomainBed reports the test environment's in-split accuracy), or,
    with none held out, every environment's out-split (the dataset's own test split);
  * ``environment_splits``: every environment's in- and out-split, held-out ones included, for the per-environment
    accuracies ``env{i}_in_acc`` / ``env{i}_out_acc`` of each evaluation.

  Raises:
    SettingError: bad environments (:func:`check_environments`).
  """
  test_envs, train_envs = check_environments(dataset, test_envs, train_envs)
  train_domains, test_domains = np.asarray(dataset.train.domains), np.asarray(dataset.test.domains)
  splits = []
  for index in range(len(dataset.domain_names)):
    splits.append((f'env{index}_in', sources.subset(dataset.train, np.flatnonzero(train_domains == index))))
    splits.append((f'env{index}_out', sources.subset(dataset.test, np.flatnonzero(test_domains == index))))
  train, test = dataset.train, dataset.test
  if train_envs:
    train = sources.subset(dataset.train, np.flatnonzero(np.isin(train_domains, train_envs)))
  if test_envs:
    test = sources.subset(dataset.train, np.flatnonzero(np.isin(train_domains, test_envs)))
  return dataclasses.replace(dataset, train=train, test=test, environment_splits=tuple(splits))


def training_environments(dataset, test_envs=(), train_envs=()) -> tuple[int, ...]:
  """The environments a run trains on: ``train_envs``, or every one of ``dataset``'s not in ``test_envs``."""
  return check_environments(dataset, test_envs, train_envs)[1] or tuple(range(len(dataset.domain_names)))
