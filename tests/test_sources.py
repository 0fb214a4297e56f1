"""Tests for overfocus_jax.data.sources: every dataset form, and every bad input -> UserError."""

import gzip
import io
import socket
import struct

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from overfocus_jax.data import imagenet, sources
from overfocus_jax.data.sources import ArraySource, load_dataset
from overfocus_jax.errors import UserError


@pytest.fixture(scope='module')
def mnist():
  return load_dataset('mnist5k')


def write_idx(path, array, *, compress=True):
  """Writes `array` as an IDX ubyte file (magic 0x000008<ndim>, big-endian dims)."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(struct.pack('>I', d) for d in array.shape)
  payload = header + array.tobytes()
  path.write_bytes(gzip.compress(payload) if compress else payload)


def write_idx_dir(directory, train, test, *, compress=True):
  """Writes MNIST-named IDX files; `train` may be None to leave the train files out."""
  suffix = '.gz' if compress else ''
  splits = {'t10k': test} if train is None else {'train': train, 't10k': test}
  for prefix, (images, labels) in splits.items():
    write_idx(directory / f'{prefix}-images-idx3-ubyte{suffix}', images[..., 0], compress=compress)
    write_idx(directory / f'{prefix}-labels-idx1-ubyte{suffix}', labels, compress=compress)
  return directory


@pytest.fixture
def idx_arrays(mnist):
  train = (mnist.train.images[:50], mnist.train.labels[:50])
  test = (mnist.test.images[:20], mnist.test.labels[:20])
  return train, test


# ----------------------------------------------------------------------------- built-in datasets


def test_mnist5k_shapes(mnist):
  assert (len(mnist.train), len(mnist.test)) == (4000, 1000)
  assert mnist.image_shape == (28, 28, 1)
  assert mnist.num_classes == 10
  assert not mnist.natural_images
  assert mnist.train.images.dtype == np.uint8
  assert mnist.train.images.shape == (4000, 28, 28, 1)
  image, label = mnist.test[0]
  assert image.shape == (28, 28, 1) and isinstance(label, int)


def test_mnist5k_split_is_deterministic(mnist):
  again = load_dataset('mnist5k')
  np.testing.assert_array_equal(again.train.images, mnist.train.images)
  np.testing.assert_array_equal(again.test.labels, mnist.test.labels)


def test_mnist5k_labels_cover_all_classes_and_are_shuffled(mnist):
  assert set(mnist.train.labels.tolist()) == set(range(10))
  assert set(mnist.test.labels.tolist()) == set(range(10))
  assert not np.all(np.diff(mnist.train.labels) >= 0)  # the raw labels come sorted


def test_mnist5k_statistics_match_train_images(mnist):
  pixels = mnist.train.images.astype(np.float64) / 255
  np.testing.assert_allclose(mnist.mean, [pixels.mean()], rtol=1e-6)
  np.testing.assert_allclose(mnist.std, [pixels.std()], rtol=1e-6)


def test_digits():
  digits = load_dataset('digits')
  assert digits.image_shape == (8, 8, 1)
  assert digits.num_classes == 10
  assert len(digits.train) + len(digits.test) == 1797
  assert len(digits.test) == 359
  assert digits.train.images.dtype == np.uint8
  assert digits.train.images.max() == 255
  assert set(digits.test.labels.tolist()) == set(range(10))


def test_array_source_is_read_only(mnist):
  with pytest.raises(ValueError):
    mnist.train.images[0, 0, 0, 0] = 1


@pytest.mark.parametrize('spec', ['', 'mnist', 'foo:bar', 'idx:', 'npz: ', 'tfds:', 'cifar10'])
def test_bad_spec(spec):
  with pytest.raises(UserError, match='mnist5k|missing its argument'):
    load_dataset(spec)


# ----------------------------------------------------------------------------- idx


def test_idx_round_trip(tmp_path, idx_arrays):
  train, test = idx_arrays
  dataset = load_dataset(f'idx:{write_idx_dir(tmp_path, train, test)}')
  np.testing.assert_array_equal(dataset.train.images, train[0])
  np.testing.assert_array_equal(dataset.train.labels, train[1])
  np.testing.assert_array_equal(dataset.test.images, test[0])
  np.testing.assert_array_equal(dataset.test.labels, test[1])
  assert dataset.image_shape == (28, 28, 1)
  assert dataset.num_classes == max(train[1].max(), test[1].max()) + 1
  assert dataset.name == f'idx:{tmp_path}'


def test_idx_uncompressed_files(tmp_path, idx_arrays):
  train, test = idx_arrays
  dataset = load_dataset(f'idx:{write_idx_dir(tmp_path, train, test, compress=False)}')
  np.testing.assert_array_equal(dataset.test.images, test[0])


def test_idx_without_train_files_has_empty_train(tmp_path, idx_arrays):
  _, test = idx_arrays
  dataset = load_dataset(f'idx:{write_idx_dir(tmp_path, None, test)}')
  assert len(dataset.train) == 0
  assert dataset.train.images.shape == (0, 28, 28, 1)
  np.testing.assert_array_equal(dataset.test.labels, test[1])
  assert len(dataset.mean) == 1  # statistics fall back to the test split


def test_idx_missing_dir(tmp_path):
  with pytest.raises(UserError, match='does not exist.*t10k-images-idx3-ubyte.gz'):
    load_dataset(f'idx:{tmp_path / "nope"}')


def test_idx_dir_without_test_files(tmp_path):
  with pytest.raises(UserError, match='no t10k-images'):
    load_dataset(f'idx:{tmp_path}')


def test_idx_only_one_train_file(tmp_path, idx_arrays):
  train, test = idx_arrays
  write_idx_dir(tmp_path, train, test)
  (tmp_path / 'train-labels-idx1-ubyte.gz').unlink()
  with pytest.raises(UserError, match='no train-labels'):
    load_dataset(f'idx:{tmp_path}')


def test_idx_bad_magic(tmp_path, idx_arrays):
  train, test = idx_arrays
  write_idx_dir(tmp_path, train, test)
  write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', test[1])  # a labels file in the images slot
  with pytest.raises(UserError, match='magic number 0x00000801, expected 0x00000803'):
    load_dataset(f'idx:{tmp_path}')


def test_idx_truncated_payload(tmp_path, idx_arrays):
  train, test = idx_arrays
  write_idx_dir(tmp_path, train, test, compress=False)
  path = tmp_path / 't10k-images-idx3-ubyte'
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(UserError, match='truncated or corrupt'):
    load_dataset(f'idx:{tmp_path}')


def test_idx_truncated_gzip(tmp_path, idx_arrays):
  train, test = idx_arrays
  write_idx_dir(tmp_path, train, test)
  path = tmp_path / 'train-images-idx3-ubyte.gz'
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(UserError, match='cannot read IDX file'):
    load_dataset(f'idx:{tmp_path}')


def test_idx_count_mismatch(tmp_path, idx_arrays):
  train, test = idx_arrays
  write_idx_dir(tmp_path, train, test)
  write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', test[1][:-1])
  with pytest.raises(UserError, match='holds 20 images but .* holds 19 labels'):
    load_dataset(f'idx:{tmp_path}')


def test_idx_train_and_test_shapes_must_agree(tmp_path, idx_arrays):
  train, test = idx_arrays
  write_idx_dir(tmp_path, (train[0][:, :27, :27], train[1]), test)
  with pytest.raises(UserError, match=r'train images .* \(27, 27, 1\) but test images'):
    load_dataset(f'idx:{tmp_path}')


# ----------------------------------------------------------------------------- npz


def npz_arrays(rng=np.random.default_rng(0)):
  return {
      'x_train': rng.integers(0, 256, (30, 6, 6, 3), dtype=np.uint8),
      'y_train': rng.integers(0, 4, 30),
      'x_test': rng.integers(0, 256, (10, 6, 6, 3), dtype=np.uint8),
      'y_test': np.arange(10) % 4,
  }


def save_npz(tmp_path, **arrays):
  path = tmp_path / 'data.npz'
  np.savez(path, **arrays)
  return f'npz:{path}'


def test_npz_round_trip(tmp_path):
  arrays = npz_arrays()
  dataset = load_dataset(save_npz(tmp_path, **arrays))
  np.testing.assert_array_equal(dataset.train.images, arrays['x_train'])
  np.testing.assert_array_equal(dataset.test.labels, arrays['y_test'])
  assert dataset.image_shape == (6, 6, 3)
  assert dataset.num_classes == 4
  assert dataset.natural_images  # three channels
  assert len(dataset.mean) == len(dataset.std) == 3


def test_npz_grayscale_nhw_and_explicit_metadata(tmp_path):
  arrays = npz_arrays()
  arrays['x_train'] = arrays['x_train'][..., 0]
  arrays['x_test'] = arrays['x_test'][..., 0]
  dataset = load_dataset(save_npz(tmp_path, **arrays, num_classes=7, natural_images=False))
  assert dataset.image_shape == (6, 6, 1)
  assert dataset.num_classes == 7
  assert not dataset.natural_images


def test_npz_missing_key(tmp_path):
  arrays = npz_arrays()
  del arrays['y_test']
  with pytest.raises(UserError, match='has no y_test'):
    load_dataset(save_npz(tmp_path, **arrays))


def test_npz_float_images(tmp_path):
  arrays = npz_arrays()
  arrays['x_test'] = arrays['x_test'].astype(np.float32) / 255
  with pytest.raises(UserError, match='float32, not uint8; save images as uint8 0..255 NHWC'):
    load_dataset(save_npz(tmp_path, **arrays))


@pytest.mark.parametrize('label, num_classes', [(-1, None), (4, 4)])
def test_npz_label_out_of_range(tmp_path, label, num_classes):
  arrays = npz_arrays()
  arrays['y_test'][3] = label
  if num_classes is not None:
    arrays['num_classes'] = num_classes
  with pytest.raises(UserError, match='test labels .* outside'):
    load_dataset(save_npz(tmp_path, **arrays))


def test_npz_float_labels(tmp_path):
  arrays = npz_arrays()
  arrays['y_train'] = arrays['y_train'].astype(np.float32)
  with pytest.raises(UserError, match='train labels .* not a 1-D integer array'):
    load_dataset(save_npz(tmp_path, **arrays))


def test_npz_mismatched_lengths(tmp_path):
  arrays = npz_arrays()
  arrays['y_train'] = arrays['y_train'][:-2]
  with pytest.raises(UserError, match='30 images but 28 labels'):
    load_dataset(save_npz(tmp_path, **arrays))


def test_npz_wrong_rank(tmp_path):
  arrays = npz_arrays()
  arrays['x_train'] = arrays['x_train'].reshape(30, -1)
  with pytest.raises(UserError, match=r'not \(N, H, W, C\)'):
    load_dataset(save_npz(tmp_path, **arrays))


def test_npz_empty_test_split(tmp_path):
  arrays = npz_arrays()
  arrays['x_test'], arrays['y_test'] = arrays['x_test'][:0], arrays['y_test'][:0]
  with pytest.raises(UserError, match='test split .* has no examples'):
    load_dataset(save_npz(tmp_path, **arrays))


def test_npz_object_arrays_are_not_unpickled(tmp_path):
  arrays = npz_arrays()
  arrays['y_test'] = np.array([{'a': 1}] * 10, dtype=object)
  with pytest.raises(UserError, match='cannot read .* plain arrays'):
    load_dataset(save_npz(tmp_path, **arrays))


def test_npz_missing_file(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    load_dataset(f'npz:{tmp_path / "missing.npz"}')


def test_npz_not_an_npz(tmp_path):
  path = tmp_path / 'junk.npz'
  path.write_bytes(b'not a zip file at all')
  with pytest.raises(UserError, match='cannot read'):
    load_dataset(f'npz:{path}')


def test_npz_single_array_file(tmp_path):
  path = tmp_path / 'one.npy'
  np.save(path, np.zeros(3))
  with pytest.raises(UserError, match='single array, not an .npz'):
    load_dataset(f'npz:{path}')


def test_npz_corrupt_zip(tmp_path):
  good = tmp_path / 'good.npz'
  np.savez(good, **npz_arrays())
  bad = tmp_path / 'bad.npz'
  bad.write_bytes(good.read_bytes()[:300])
  with pytest.raises(UserError, match='cannot read'):
    load_dataset(f'npz:{bad}')


# ----------------------------------------------------------------------------- tfds


@pytest.mark.parametrize('name, shape, natural', [
    ('mnist', (28, 28, 1), False),
    ('cifar10', (32, 32, 3), True),
])
def test_tfds_mocked(name, shape, natural):
  with tfds.testing.mock_data(num_examples=6):
    dataset = load_dataset(f'tfds:{name}')
  assert dataset.image_shape == shape
  assert dataset.num_classes == 10
  assert dataset.natural_images == natural
  assert len(dataset.train) == len(dataset.test) == 6
  assert len(dataset.mean) == shape[-1]
  image, label = dataset.train[5]
  assert image.shape == shape and image.dtype == np.uint8
  assert isinstance(label, int) and 0 <= label < 10


@pytest.fixture
def no_network(monkeypatch):
  """Records (and blocks) every attempt to open a network connection."""
  attempts = []

  def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError('network access attempted in a test')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'getaddrinfo', refuse)
  return attempts


def test_tfds_unprepared_dataset(tmp_path, no_network):
  with pytest.raises(UserError, match=f'not prepared at {tmp_path}.*tfds build mnist'):
    load_dataset('tfds:mnist', data_dir=str(tmp_path))
  assert not no_network


def test_tfds_unknown_name(tmp_path, no_network):
  with pytest.raises(UserError, match="no dataset named 'no_such_dataset_xyz'"):
    load_dataset('tfds:no_such_dataset_xyz', data_dir=str(tmp_path))
  assert not no_network


def test_tfds_variable_size_images_are_rejected(tmp_path):
  with pytest.raises(UserError, match='variable or unusual shape'):
    load_dataset('tfds:imagenette', data_dir=str(tmp_path))


def _png(image):
  """PNG bytes as a file object: tfds stores them as-is, so preparing needs no TensorFlow."""
  buffer = io.BytesIO()
  PIL.Image.fromarray(image[..., 0]).save(buffer, format='PNG')
  buffer.seek(0)
  return buffer


class OverfocusTinyDigits(tfds.core.GeneratorBasedBuilder):
  """A real (unmocked) array_record TFDS dataset with only train and validation splits."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    features = tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 1)),
        'label': tfds.features.ClassLabel(num_classes=3),
    })
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(12), 'validation': self._generate_examples(5)}

  def _generate_examples(self, count):
    rng = np.random.default_rng(count)
    for i in range(count):
      yield i, {'image': _png(rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)), 'label': i % 3}


def test_tfds_prepared_dataset_uses_validation_split(tmp_path, no_network):
  OverfocusTinyDigits(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  dataset = load_dataset('tfds:overfocus_tiny_digits', data_dir=str(tmp_path))
  assert (len(dataset.train), len(dataset.test)) == (12, 5)
  assert dataset.image_shape == (8, 8, 1)
  assert dataset.num_classes == 3
  assert not dataset.natural_images
  images = np.stack([dataset.train[i][0] for i in range(12)])
  np.testing.assert_allclose(dataset.mean, [images.mean() / 255], rtol=1e-6)
  assert not no_network


def test_tfds_split_names():
  assert sources._tfds_split_names('s', {'train': 1, 'test': 2, 'validation': 3}) == (
      'train', 'test')
  assert sources._tfds_split_names('s', {}) == ('train', 'test')  # mocked: no split metadata
  with pytest.raises(UserError, match='neither a test nor a validation split'):
    sources._tfds_split_names('s', {'train': 1})
  with pytest.raises(UserError, match='no train split'):
    sources._tfds_split_names('s', {'test': 1})


def test_tfds_source_adds_channel_axis_to_grayscale():
  source = sources.TfdsSource([{'image': np.zeros((5, 4), np.uint8), 'label': np.int64(2)}])
  image, label = source[0]
  assert image.shape == (5, 4, 1) and label == 2 and len(source) == 1


def test_array_source_items():
  source = ArraySource(np.zeros((3, 2, 2, 1), np.uint8), np.array([0, 1, 2]))
  assert len(source) == 3
  assert source[2][1] == 2 and isinstance(source[2][1], int)



# ----------------------------------------------------------------------------- config.normalization


def test_normalization_follows_the_pretrained_weights(mnist):
  """auto: the dataset's own statistics from scratch, ImageNet's (their channel average for 1 channel) from
  pretrained weights; dataset: always its own; imagenet: always ImageNet's."""
  own = (mnist.mean, mnist.std)
  assert own != (imagenet.IMAGENET_GREY_MEAN, imagenet.IMAGENET_GREY_STD)
  as_ = lambda dataset, choice, pretrained: (lambda d: (d.mean, d.std))(
      sources.normalized_as(dataset, choice, pretrained=pretrained))
  assert as_(mnist, 'auto', False) == own and as_(mnist, 'dataset', True) == own
  grey = (imagenet.IMAGENET_GREY_MEAN, imagenet.IMAGENET_GREY_STD)
  assert as_(mnist, 'auto', True) == grey and as_(mnist, 'imagenet', False) == grey
  rgb = load_dataset('mnist5k_rgb')
  assert as_(rgb, 'auto', True) == (imagenet.IMAGENET_MEAN, imagenet.IMAGENET_STD)
  assert as_(rgb, 'auto', False) == (rgb.mean, rgb.std)
  np.testing.assert_allclose(np.mean(imagenet.IMAGENET_MEAN), imagenet.IMAGENET_GREY_MEAN[0], atol=1e-3)


def test_imagenet_normalization_needs_one_or_three_channels():
  """ColoredMNIST's 2 channels: auto keeps their own statistics, imagenet is a setting error naming the fix."""
  two = load_dataset('colored_mnist')
  assert sources.normalized_as(two, 'auto', pretrained=True) is two
  with pytest.raises(sources.SettingError, match="normalization='imagenet' needs 1- or 3-channel images") as error:
    sources.normalized_as(two, 'imagenet', pretrained=False)
  assert error.value.setting == 'normalization'


@pytest.mark.parametrize('value, fragments', [
    ('imagenet', ["normalization='imagenet' needs 1- or 3-channel", "--config.normalization to dataset"]),
    ('zscore', ["unknown normalization 'zscore'", 'auto, dataset, imagenet']),
])
def test_bad_normalization_is_one_line(tmp_path, capsys, value, fragments):
  from conftest import assert_one_line_error, run_cli
  code, _, err = run_cli(capsys, 'train', '--workdir', tmp_path / 'run', '--config.dataset=colored_mnist',
                         '--config.model=mnist_cnn', f'--config.normalization={value}', '--no-progress')
  assert_one_line_error(code, err, *fragments)
  assert not (tmp_path / 'run' / 'checkpoints').exists()
