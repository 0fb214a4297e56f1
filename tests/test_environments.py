"""Tests for overfocus_jax.data.environments: DomainBed's ColoredMNIST and RotatedMNIST built from an MNIST-like base.

The statistics are checked within 4 binomial standard deviations of the documented rates for each environment's
size (about 1,667 examples on mnist5k), and the construction is re-derived step by step from the base.
"""

import gzip
import pathlib
import struct
import types

import numpy as np
import pytest

from overfocus_jax.data import environments as env
from overfocus_jax.data.sources import load_dataset
from overfocus_jax.errors import UserError
from tests.conftest import BASE_RUN_ARGS, assert_one_line_error, run_cli

DATA_GUIDE = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'guide' / 'data.md'


@pytest.fixture(scope='module')
def base():
  return load_dataset('mnist5k')


@pytest.fixture(scope='module')
def colored():
  return load_dataset('colored_mnist')


@pytest.fixture(scope='module')
def rotated():
  return load_dataset('rotated_mnist')


def base_environments(base, num_envs):
  """The base's environments before colouring or rotation: (images, digits) per environment, re-derived."""
  rng = np.random.default_rng(env.DATA_SEED)
  return env.split_environments(*env.shuffle_base(*env.base_arrays(base), rng), num_envs)


def environment_examples(dataset, index):
  """Environment ``index``'s in- then out-split (images, labels), and the keys that picked them from the env."""
  (in_x, in_y), (out_x, out_y) = env.environment_arrays(dataset, index)
  return np.concatenate([in_x, out_x]), np.concatenate([in_y, out_y])


def environment_keys(count, index):
  in_keys, out_keys = env.split_keys(count, index)
  return np.concatenate([in_keys, out_keys])


def within_binomial(rate, p, n, sigmas=4.0):
  return abs(rate - p) <= sigmas * np.sqrt(p * (1 - p) / n)


def write_idx_dir(directory, split_arrays):
  """MNIST-named gzipped IDX files for {'train': (images, labels), 't10k': (images, labels)}."""
  for prefix, (images, labels) in split_arrays.items():
    for stem, array in (('images', images[..., 0]), ('labels', labels)):
      array = np.asarray(array, np.uint8)
      header = bytes([0, 0, 0x08, array.ndim]) + b''.join(struct.pack('>I', d) for d in array.shape)
      (directory / f'{prefix}-{stem}-idx{array.ndim}-ubyte.gz').write_bytes(gzip.compress(header + array.tobytes()))
  return directory


# ----------------------------------------------------------------------------- ColoredMNIST


def test_colored_shape_and_metadata(colored):
  assert colored.image_shape == (28, 28, 2) and colored.train.images.shape[1:] == (28, 28, 2)
  assert colored.num_classes == 2 and not colored.natural_images
  assert colored.domain_names == ('+90%', '+80%', '-90%')
  assert colored.mean == (0.0, 0.0) and colored.std == (1.0, 1.0)  # x / 255, as DomainBed's ToTensor
  assert set(np.unique(colored.train.labels)) == {0, 1}


def test_colored_one_channel_holds_the_digit_the_other_is_zero(colored, base):
  for index, (digit_images, _) in enumerate(base_environments(base, 3)):
    images, _ = environment_examples(colored, index)
    keys = environment_keys(len(digit_images), index)
    lit = images.reshape(len(images), -1, 2).max(axis=1) > 0
    assert not np.any(lit[:, 0] & lit[:, 1]), 'both channels lit in one image'
    colour = lit[:, 1].astype(int)
    np.testing.assert_array_equal(images[np.arange(len(images)), :, :, colour], digit_images[keys][..., 0])
    np.testing.assert_array_equal(images[np.arange(len(images)), :, :, 1 - colour], 0)


@pytest.mark.parametrize('index', [0, 1, 2])
def test_colored_colour_agrees_with_label_at_one_minus_e(colored, index):
  images, labels = environment_examples(colored, index)
  colour = (images[..., 1].reshape(len(images), -1).max(axis=1) > 0).astype(int)
  agreement = np.mean(colour == labels)
  assert within_binomial(agreement, 1 - env.COLOR_FLIPS[index], len(labels)), (index, agreement)


@pytest.mark.parametrize('index', [0, 1, 2])
def test_colored_label_is_digit_below_five_with_25_percent_noise(colored, base, index):
  _, digits = base_environments(base, 3)[index]
  _, labels = environment_examples(colored, index)
  clean = (digits[environment_keys(len(digits), index)] < 5).astype(int)
  noise = np.mean(labels != clean)
  assert within_binomial(noise, env.LABEL_NOISE, len(labels)), (index, noise)


def test_colorize_puts_the_digit_in_the_colour_channel():
  images = np.arange(2 * 2 * 2, dtype=np.uint8).reshape(2, 2, 2, 1) + 1
  out = env.colorize(images, np.array([0, 1]))
  np.testing.assert_array_equal(out[0, ..., 0], images[0, ..., 0])
  np.testing.assert_array_equal(out[0, ..., 1], 0)
  np.testing.assert_array_equal(out[1, ..., 1], images[1, ..., 0])
  np.testing.assert_array_equal(out[1, ..., 0], 0)


# ----------------------------------------------------------------------------- RotatedMNIST


def test_rotated_shape_and_metadata(rotated):
  assert rotated.image_shape == (28, 28, 1) and rotated.num_classes == 10
  assert rotated.domain_names == ('0', '15', '30', '45', '60', '75')
  assert rotated.mean == (0.0,) and rotated.std == (1.0,)


def test_rotated_environments_are_the_base_digits_rotated_by_their_angle(rotated, base):
  for index, (digit_images, digits) in enumerate(base_environments(base, 6)):
    images, labels = environment_examples(rotated, index)
    keys = environment_keys(len(digits), index)
    np.testing.assert_array_equal(labels, digits[keys])
    sample = slice(0, 25)
    np.testing.assert_array_equal(images[sample], env.rotate_images(digit_images[keys][sample], env.ANGLES[index]))
  zero_images, _ = environment_examples(rotated, 0)
  np.testing.assert_array_equal(zero_images, base_environments(base, 6)[0][0][environment_keys(len(zero_images), 0)])


def test_rotation_is_counter_clockwise_about_the_centre():
  image = np.zeros((1, 28, 28, 1), np.uint8)
  image[0, 13:15, 20:26, 0] = 255  # a bar right of the centre (14, 14)
  np.testing.assert_array_equal(env.rotate_images(image, 90), np.rot90(image, axes=(1, 2)))  # right → top
  np.testing.assert_array_equal(env.rotate_images(image, 0), image)
  tilted = env.rotate_images(image, 45)[0, ..., 0].astype(float)
  rows, cols = np.indices(tilted.shape)
  centroid = (np.sum(rows * tilted) / tilted.sum(), np.sum(cols * tilted) / tilted.sum())
  # the bar's centre, 9 px right of the image centre (pixel index 13.5, 13.5), moves up along the 45° diagonal
  assert centroid[0] == pytest.approx(13.5 - 9 / np.sqrt(2), abs=0.1)
  assert centroid[1] == pytest.approx(13.5 + 9 / np.sqrt(2), abs=0.1)


def test_rotated_digits_keep_their_ink(rotated):
  """Bicubic interpolation with zero fill keeps each environment's total intensity within a few percent of the
  unrotated environment's (the digits are centred, so little ink leaves the frame)."""
  ink = [environment_examples(rotated, index)[0].astype(float).mean() for index in range(6)]
  assert all(0.95 < value / ink[0] < 1.05 for value in ink), ink


# ----------------------------------------------------------------------------- environments and splits


@pytest.mark.parametrize('spec, sizes', [('colored_mnist', [1667, 1667, 1666]),
                                         ('rotated_mnist', [834, 834, 833, 833, 833, 833])])
def test_environment_sizes_and_80_20_in_out(spec, sizes, colored, rotated):
  dataset = colored if spec == 'colored_mnist' else rotated
  assert len(dataset.train) + len(dataset.test) == 5000
  for index, size in enumerate(sizes):
    in_rows, out_rows = env.environment_rows(dataset, index)
    assert (len(in_rows), len(out_rows)) == (size - int(size * 0.2), int(size * 0.2))
  assert dataset.train.domains.dtype == np.int64 and not dataset.train.domains.flags.writeable
  np.testing.assert_array_equal(np.bincount(dataset.train.domains) + np.bincount(dataset.test.domains), sizes)
  assert np.all(np.diff(dataset.train.domains) >= 0)  # environment 0's in-split first, then 1's, ...


def test_split_keys_are_domainbeds_split_dataset():
  in_keys, out_keys = env.split_keys(1667, 2)
  assert len(out_keys) == 333 and len(in_keys) == 1334
  assert sorted(np.concatenate([in_keys, out_keys]).tolist()) == list(range(1667))
  again_in, again_out = env.split_keys(1667, 2)
  np.testing.assert_array_equal(in_keys, again_in)
  np.testing.assert_array_equal(out_keys, again_out)
  assert not np.array_equal(out_keys, env.split_keys(1667, 1)[1])  # seeded per environment
  assert not np.array_equal(out_keys, env.split_keys(1667, 2, trial_seed=1)[1])  # and per trial
  # DomainBed: keys = list(range(n)); RandomState(seed_hash(trial_seed, env_i)).shuffle(keys); out = keys[:n // 5]
  keys = list(range(1667))
  np.random.RandomState(env.seed_hash(0, 2)).shuffle(keys)
  assert out_keys.tolist() == keys[:333] and in_keys.tolist() == keys[333:]
  assert env.seed_hash(0, 2) == int(__import__('hashlib').md5(b'(0, 2)').hexdigest(), 16) % 2**31


def test_a_trial_seed_splits_the_same_environments_anew(colored):
  """DomainBed's --trial_seed: the same examples in each environment (same digits, colours, labels), another 80/20
  in/out split, as split_keys(..., trial_seed) picks it."""
  other = load_dataset('colored_mnist', trial_seed=1)
  assert env.fingerprint(load_dataset('colored_mnist', trial_seed=0)) == env.fingerprint(colored)
  for index in range(3):
    (in_x, in_y), (out_x, out_y) = env.environment_arrays(colored, index)
    (in_x1, in_y1), (out_x1, out_y1) = env.environment_arrays(other, index)
    assert (len(in_y1), len(out_y1)) == (len(in_y), len(out_y))
    assert not np.array_equal(out_x1, out_x)  # another out-split
    # Undo each split: both give back the environment in its construction order.
    count = len(in_y) + len(out_y)
    for trial, (ins, outs) in ((0, (in_x, out_x)), (1, (in_x1, out_x1))):
      keys = np.concatenate(env.split_keys(count, index, trial_seed=trial))
      restored = np.empty((count, *ins.shape[1:]), ins.dtype)
      restored[keys] = np.concatenate([ins, outs])
      if trial == 0:
        reference = restored
      np.testing.assert_array_equal(restored, reference)


def test_environment_rows_errors(base, colored):
  with pytest.raises(UserError, match='has no environments'):
    env.environment_rows(base, 0)
  with pytest.raises(UserError, match=r'no environment 3; use one of 0 \(\+90%\), 1 \(\+80%\), 2 \(-90%\)'):
    env.environment_rows(colored, 3)


# ----------------------------------------------------------------------------- checksums and bases


def test_checksums_match_the_documentation(colored, rotated):
  assert env.fingerprint(colored) == env.COLORED_MNIST5K_SHA256
  assert env.fingerprint(rotated) == env.ROTATED_MNIST5K_SHA256
  guide = ' '.join(DATA_GUIDE.read_text().split())
  for digest in (env.COLORED_MNIST5K_SHA256, env.ROTATED_MNIST5K_SHA256):
    assert digest in env.__doc__ and digest in guide


def test_any_mnist_like_base_gives_the_same_construction(tmp_path, base, colored):
  """`colored_mnist:idx:DIR` holding mnist5k's split builds the same arrays; so does a record-by-record source
  (a TFDS split has no `.images`)."""
  directory = write_idx_dir(tmp_path, {'train': (base.train.images, base.train.labels),
                                       't10k': (base.test.images, base.test.labels)})
  assert env.fingerprint(load_dataset(f'colored_mnist:idx:{directory}')) == env.COLORED_MNIST5K_SHA256
  assert env.fingerprint(load_dataset('colored_mnist:mnist5k')) == env.COLORED_MNIST5K_SHA256

  class Records:
    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitem__(self, i):
      return self.source[i]

  record_base = types.SimpleNamespace(name='records', train=Records(base.train), test=Records(base.test),
                                      image_shape=(28, 28, 1), num_classes=10, domain_names=())
  built = env.build('colored_mnist:records', env.COLORED, record_base)
  np.testing.assert_array_equal(built.train.images, colored.train.images)
  np.testing.assert_array_equal(built.test.labels, colored.test.labels)


def test_too_small_base_is_an_error(tmp_path, base):
  np.savez(tmp_path / 'tiny.npz', x_train=base.train.images[:10], y_train=np.arange(10),
           x_test=base.test.images[:2], y_test=np.arange(2))
  with pytest.raises(UserError, match='too few for 6 environments'):
    load_dataset(f'rotated_mnist:npz:{tmp_path / "tiny.npz"}')


@pytest.mark.parametrize('spec, fragments', [
    ('colored_mnist:nosuch', ("unknown dataset 'nosuch'",)),
    ('rotated_mnist:digits', ("base 'digits' has 8x8x1 images, not MNIST's 28x28x1", 'rotated_mnist[:BASE]')),
    ('colored_mnist:mnist5k_rgb', ('28x28x3 images',)),
    ('colored_mnist:', ('missing its base',)),
    ('colored_mnist:rotated_mnist', ('itself an environment dataset',)),
])
def test_bad_specs_are_one_line_errors(capsys, tmp_path, spec, fragments):
  code, _, err = run_cli(capsys, 'train', '--workdir', tmp_path / 'run', *BASE_RUN_ARGS, f'--config.dataset={spec}')
  assert_one_line_error(code, err, *fragments)


def test_base_without_ten_classes_is_a_one_line_error(capsys, tmp_path, base):
  np.savez(tmp_path / 'binary.npz', x_train=base.train.images[:100], y_train=base.train.labels[:100] % 2,
           x_test=base.test.images[:20], y_test=base.test.labels[:20] % 2)
  spec = f'colored_mnist:npz:{tmp_path / "binary.npz"}'
  code, _, err = run_cli(capsys, 'train', '--workdir', tmp_path / 'run', *BASE_RUN_ARGS, f'--config.dataset={spec}')
  assert_one_line_error(code, err, 'has 2 classes, not 10')


# ----------------------------------------------------------------------------- colour vs digit evidence


def colour_attribution_script():
  import importlib.util
  path = DATA_GUIDE.parents[2] / 'experiments' / 'colour_attribution.py'
  spec = importlib.util.spec_from_file_location('colour_attribution', path)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  return script


def test_colour_and_digit_evidence_add_up_to_the_margin():
  """experiments/colour_attribution.py's two-leg path 0 → x̄ → x: on a model quadratic in x the 16-step midpoint
  rule is exact, so R_digit + R_colour is m(x) − m(0), each leg's sum its own margin difference."""
  import jax
  import jax.numpy as jnp
  script = colour_attribution_script()
  digits = jax.random.uniform(jax.random.PRNGKey(0), (6, 5, 5, 1))
  zeros = jnp.zeros_like(digits[:3])
  images = jnp.concatenate([jnp.concatenate([digits[:3], zeros], -1),   # three digits in colour 0
                            jnp.concatenate([zeros, digits[3:]], -1)])  # three in colour 1
  labels = jnp.array([0, 1, 0, 1, 1, 0])
  np.testing.assert_array_equal(script.colour_neutral(images), jnp.concatenate([digits / 2, digits / 2], -1))
  np.testing.assert_array_equal(script.colour_flipped(images)[..., 0], images[..., 1])
  w = jax.random.normal(jax.random.PRNGKey(1), (50, 2))
  logits = lambda x: (x.reshape(len(x), -1) @ w) + 0.1 * (x.reshape(len(x), -1) @ w) ** 2
  margin_fn = lambda x: script.margins(logits(x))
  e = script.path_evidence(margin_fn, images, labels, steps=16)
  np.testing.assert_allclose(e['digit'], e['m_neutral'] - e['m_black'], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(e['colour'], e['m_image'] - e['m_neutral'], rtol=1e-4, atol=1e-5)
  margin = logits(images)[:, 0] - logits(images)[:, 1]
  np.testing.assert_allclose(e['m_image'], np.where(labels == 0, margin, -margin), rtol=1e-5)


def test_relevance_mass_on_the_colour_of_known_colour_and_digit_readers():
  """The tools' relevance mass: a margin that reads only the colour (channel 0 minus channel 1) puts all of the input
  relevance on the opponent coordinate, one that reads only the ink (both channels alike) all on the luminance; a
  unit's colour dependence is 0 when the flip leaves it, 1 when it fires for one colour only."""
  import jax
  import jax.numpy as jnp
  script = colour_attribution_script()
  digits = jax.random.uniform(jax.random.PRNGKey(0), (4, 5, 5, 1))
  zeros = jnp.zeros_like(digits)
  images = jnp.concatenate([jnp.concatenate([digits[:2], zeros[:2]], -1), jnp.concatenate([zeros[2:], digits[2:]], -1)])
  labels = jnp.array([0, 0, 1, 1])  # the colour's label: channel 0 → class 0
  w = jax.random.uniform(jax.random.PRNGKey(1), (5, 5))
  colour_reader = lambda x: script.margins(jnp.stack([jnp.sum(w * (x[..., 0] - x[..., 1]), (1, 2)), 0 * x[:, 0, 0, 0]], 1))
  ink_reader = lambda x: script.margins(jnp.stack([jnp.sum(w * (x[..., 0] + x[..., 1]), (1, 2)), 0 * x[:, 0, 0, 0]], 1))
  colour, digit = script.input_relevance(colour_reader, images, labels)
  assert np.all(colour > 0) and np.allclose(digit, 0)
  colour, digit = script.input_relevance(ink_reader, images, jnp.zeros(4, int))  # class 0 gains from any ink
  assert np.allclose(colour, 0) and np.all(digit > 0)
  np.testing.assert_allclose(script.colour_dependence(jnp.array([[1., 0., 2., 0., -1.]]), jnp.array([[1., 1., 0., 0., 1.]])),
                             [[0., 1., 1., 0., 1.]])
  bound, total = script.colour_bound_relevance(jnp.array([[[3., 1.]], [[0., 0.]]]), jnp.array([[[1., 0.]], [[1., 1.]]]))
  np.testing.assert_allclose(bound, [3., 0.]) and np.testing.assert_allclose(total, [4., 0.])
  assert script.share(np.array([3., 0.]), np.array([4., 0.])) == 0.75 and script.share(np.zeros(2), np.zeros(2)) is None


def test_the_tools_relevance_of_a_real_model_with_both_splits():
  """On DomainBed's MNIST_CNN (latent and pooled splits) every share is computed, per image, and lies in [0, 1]."""
  import jax
  import jax.numpy as jnp
  from overfocus_jax import config as config_lib, models
  script = colour_attribution_script()
  config = config_lib.load_config_file(DATA_GUIDE.parents[2] / 'experiments' / 'configs' / 'mnist_cnn.py')
  model = models.build_model(config, 2)
  variables = model.init(jax.random.PRNGKey(0), (28, 28, 2))
  images = jnp.concatenate([jax.random.uniform(jax.random.PRNGKey(2), (3, 28, 28, 1)), jnp.zeros((3, 28, 28, 1))], -1)
  out = script.tool_relevance(model, variables, images, jnp.array([0, 1, 0]))
  assert set(out) == {'input_colour', 'input_digit', 'sgdrop_colour', 'sgdrop_total', 'units_colour', 'units_total',
                      'rsc_colour', 'rsc_total'}
  assert all(v.shape == (3,) and np.all(np.isfinite(v)) for v in out.values())
  for key in ('sgdrop', 'units', 'rsc'):
    assert 0 <= script.share(out[f'{key}_colour'], out[f'{key}_total']) <= 1
