"""Folders of PNG/JPEG images: the `imagefolder:DIR[:SIZE][:domains]` dataset spec.

Three layouts, one label per class folder (class names sorted alphabetically give labels 0, 1, ..., like
torchvision's `ImageFolder`):

* `DIR/train/CLASS/*.png|jpg|jpeg` and `DIR/test/CLASS/...` (`DIR/val/` when there is no `DIR/test/`): the given
  split. Both splits must hold the same class folders.
* `DIR/CLASS/...`: a seeded 80/20 split (see :func:`split_indices`), the same on every run and every machine.
* `DIR/DOMAIN/CLASS/...` with the `:domains` option (DomainBed, e.g. PACS): the domains are environments; the same
  seeded 80/20 split within every domain and class, every domain holding the same class folders: the 80% is the
  domain's in-split, the 20% its out-split. `config.environments.trial_seed` (DomainBed's `--trial_seed`, default 0)
  draws another split. Each example's domain is `source.domains[i]`, an index into `source.domain_names` (also
  `ImageDataset.domain_names`).

The layout is never guessed between the last two: without `:domains`, a class folder that holds folders is an
error that names `:domains`. `SIZE` (else `config.image_size`, else 64) is the side of the square images the models
see: each image is resized (bilinear) so that its shorter side is `SIZE`, then centre-cropped to `SIZE`×`SIZE`. Images are RGB, or
single-channel `L` when every image of the folder is stored greyscale (PIL modes 1, L, LA). Normalisation uses the
ImageNet mean and standard deviation (their channel average for `L`), what pretrained backbones expect.

Loading reads every file's header once (PIL's `Image.open(...).verify()`, on a few threads): a file that is not a
`.png`/`.jpg`/`.jpeg`, or that PIL cannot open as PNG or JPEG (only those two decoders are ever used), is a bad
file. Bad files are a one-line error naming the first, or with `skip_bad_images` are left out and counted on
stderr. Pixels are decoded only when an example is read (`source[i]`, in grain's threads or worker processes), so
a large folder is never held in memory; a file whose header passed but whose pixels do not decode (a truncated
JPEG, which `verify` cannot see) is a one-line error naming it at that moment. Dot-files (`.DS_Store`) are ignored.
Nothing is ever unpickled.
"""

import concurrent.futures
import dataclasses
import os
import sys
import zlib

import numpy as np
from PIL import Image

from overfocus_jax.data.imagenet import imagenet_statistics
from overfocus_jax.errors import SettingError, UserError

DEFAULT_SIZE = 64
MAX_SIZE = 4096
DOMAINS_OPTION = 'domains'
EXTENSIONS = ('.png', '.jpg', '.jpeg')
FORMATS = ('PNG', 'JPEG')  # the only decoders PIL may use on these files
TEST_DIRS = ('test', 'val')
SPLIT_SEED = 0  # fixed: the split of DIR/CLASS folders must not depend on the user's seed (domains: trial_seed)
TEST_FRACTION = 0.2
GREY_MODES = frozenset({'1', 'L', 'LA'})
SYNTAX = ('imagefolder:DIR[:SIZE][:domains] with DIR/train/CLASS/*.png and DIR/test/CLASS/*.png, DIR/CLASS/*.png '
          '(a seeded 80/20 split), or DIR/DOMAIN/CLASS/*.png with :domains')
_MAX_PROBE_THREADS = 16


@dataclasses.dataclass(frozen=True)
class Folder:
  """A scanned image folder: the two sources and what the dataset needs to know about them."""

  train: 'ImageFolderSource'
  test: 'ImageFolderSource'
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  domain_names: tuple[str, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]


class ImageFolderSource:
  """Image files and their labels: `src[i]` decodes file `i` (PIL) to a uint8 `(SIZE, SIZE, C)` array.

  Attributes:
    paths: one file path per example.
    labels: read-only int64 class indices into `class_names`.
    domains: read-only int64 domain indices into `domain_names` (the `:domains` layout), else None.
  """

  decoded_on_read = True  # reading a whole split decodes every file: data_on_device=auto keeps it on the host

  def __init__(self, paths, labels, domains, *, size: int, mode: str, class_names, domain_names=()):
    self.paths = list(paths)
    self.labels = _read_only(np.asarray(labels, np.int64))
    self.domains = None if domains is None else _read_only(np.asarray(domains, np.int64))
    self.size, self.mode = size, mode
    self.class_names, self.domain_names = tuple(class_names), tuple(domain_names)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return decode(self.paths[index], self.size, self.mode), int(self.labels[index])


def load(spec: str, arg: str, *, skip_bad_images: bool = False, trial_seed: int = 0, image_size: int = 0) -> Folder:
  """Scans the folder of `imagefolder:ARG` (headers only) and splits it.

  ``trial_seed`` seeds the split of the domains' folders (``:domains``), DomainBed's ``--trial_seed``.
  ``image_size`` (``config.image_size``): the images' side when the spec gives no `:SIZE` (0: 64).

  Raises:
    UserError: a bad spec, a missing or malformed folder, inconsistent class folders, or a bad file (the latter a
      SettingError naming `skip_bad_images` when it is off).
  """
  directory, spec_size, with_domains = parse_spec(spec, arg)
  size = image_side(spec, spec_size, image_size)
  roots = _roots(spec, directory, with_domains)
  classes = {name: _class_dirs(spec, root) for name, root in roots.items()}
  class_names = _same_classes(spec, roots, classes)
  files, bad = _list_files(spec, roots, classes, with_domains)
  modes, bad = _probe_all(files, bad)
  _report_bad(spec, bad, skip_bad_images)
  files = {key: [path for path in paths if modes.get(path)] for key, paths in files.items()}
  _check_not_emptied(spec, roots, files)
  mode = 'L' if all(m in GREY_MODES for m in modes.values() if m) else 'RGB'
  train, test = _split(files, roots, class_names, with_domains, trial_seed if with_domains else SPLIT_SEED)
  domain_names = tuple(roots) if with_domains else ()
  make = lambda part: ImageFolderSource(*part, size=size, mode=mode, class_names=class_names,
                                        domain_names=domain_names)
  mean, std = imagenet_statistics(1 if mode == 'L' else 3)
  return Folder(make(train), make(test), (size, size, 1 if mode == 'L' else 3), class_names, domain_names, mean, std)


# ----------------------------------------------------------------------------- the spec


def parse_spec(spec: str, arg: str) -> tuple[str, int | None, bool]:
  """`DIR[:SIZE][:domains]` (the options in either order) -> (directory, size or None, with_domains)."""
  parts = arg.split(':')
  size, with_domains = None, False
  while len(parts) > 1 and _is_option(parts[-1]):
    token = parts.pop().strip()
    if token == DOMAINS_OPTION:
      _require(not with_domains, f'dataset {spec!r} repeats :{DOMAINS_OPTION}', f'write it as {SYNTAX}')
      with_domains = True
    else:
      _require(size is None, f'dataset {spec!r} gives two image sizes', f'write it as {SYNTAX}')
      size = int(token)
      _require(1 <= size <= MAX_SIZE, f'image size {size} in dataset {spec!r} is not in 1..{MAX_SIZE}',
               f'give the side in pixels, e.g. imagefolder:DIR:{DEFAULT_SIZE}')
  directory = ':'.join(parts).strip()
  _require(bool(directory), f'dataset {spec!r} names no directory', f'write it as {SYNTAX}')
  return os.path.expanduser(directory), size, with_domains


def image_side(spec: str, spec_size: int | None, image_size: int) -> int:
  """The side images are resized to: the spec's `:SIZE`, else `config.image_size` (when not 0), else 64; a spec's
  SIZE and a different `image_size` are a SettingError."""
  if spec_size is not None and image_size and image_size != spec_size:
    raise SettingError('image_size', f'config image_size={image_size} and dataset {spec!r} give different image '
                                     f'sizes', f'{spec_size} or 0 (the dataset\'s :{spec_size}), or drop :{spec_size} '
                                     'from the dataset')
  return spec_size or image_size or DEFAULT_SIZE


def _is_option(token: str) -> bool:
  token = token.strip()
  return token == DOMAINS_OPTION or token.isdigit()


# ----------------------------------------------------------------------------- the layout


def _roots(spec: str, directory: str, with_domains: bool) -> dict[str, str]:
  """The folders whose subfolders are classes, by name: splits ('train', 'test'), domains, or '' for DIR itself."""
  _require(os.path.isdir(directory), f'dataset {spec!r} not found: directory {directory} does not exist',
           f'write it as {SYNTAX}')
  subdirs = _subdirs(directory)
  _require(bool(subdirs), f'dataset {spec!r}: {directory} holds no folders', f'write it as {SYNTAX}')
  test_dir = next((name for name in TEST_DIRS if name in subdirs), None)
  if with_domains:
    _require(not ('train' in subdirs and test_dir), f'dataset {spec!r}: {directory} holds train/ and {test_dir}/, '
             f'not domains', f'drop :{DOMAINS_OPTION} for the DIR/train/CLASS layout')
    return {name: os.path.join(directory, name) for name in subdirs}
  if 'train' in subdirs or test_dir:
    _require('train' in subdirs, f'dataset {spec!r}: {directory} has {test_dir}/ but no train/',
             f'add {os.path.join(directory, "train")}/CLASS/ folders of images')
    _require(test_dir is not None, f'dataset {spec!r}: {directory} has train/ but no test/',
             f'add {os.path.join(directory, "test")}/CLASS/ folders of images, or move the class folders up into '
             f'{directory} for a seeded 80/20 split')
    return {'train': os.path.join(directory, 'train'), 'test': os.path.join(directory, test_dir)}
  return {'': directory}


def _subdirs(directory: str) -> list[str]:
  """The sorted names of the folders in `directory`, dot-folders left out."""
  with os.scandir(directory) as entries:
    return sorted(e.name for e in entries if not e.name.startswith('.') and e.is_dir())


def _class_dirs(spec: str, root: str) -> dict[str, str]:
  """Class name -> class folder, sorted by name."""
  names = _subdirs(root)
  _require(bool(names), f'dataset {spec!r}: {root} holds no class folders',
           f'put the images of each class in a folder of its own: {SYNTAX}')
  return {name: os.path.join(root, name) for name in names}


def _same_classes(spec: str, roots: dict[str, str], classes: dict[str, dict[str, str]]) -> tuple[str, ...]:
  """The class names (sorted), which every split or domain must share: labels come from their order."""
  union = sorted(set().union(*classes.values()))
  lacking = [f'{roots[name]} lacks {", ".join(c for c in union if c not in found)}'
             for name, found in classes.items() if len(found) < len(union)]
  _require(not lacking, f'dataset {spec!r}: class folders differ ({"; ".join(lacking)})',
           'give every split (or domain) the same class folders')
  return tuple(union)


def _list_files(spec, roots, classes, with_domains) -> tuple[dict, list[tuple[str, str]]]:
  """(root name, class) -> sorted image paths; plus the bad entries (path, reason) found on the way."""
  files, bad = {}, []
  for name, class_dirs in classes.items():
    bad += _stray_images(roots[name])
    for class_name, class_dir in class_dirs.items():
      files[name, class_name], class_bad = _class_files(spec, class_dir, with_domains)
      bad += class_bad
  return files, bad


def _stray_images(root: str) -> list[tuple[str, str]]:
  """Images beside the class folders have no label: bad files (other files there, a README, are ignored)."""
  with os.scandir(root) as entries:
    return [(e.path, 'an image outside any class folder') for e in sorted(entries, key=lambda e: e.name)
            if not e.name.startswith('.') and not e.is_dir() and e.name.lower().endswith(EXTENSIONS)]


def _class_files(spec: str, class_dir: str, with_domains: bool) -> tuple[list[str], list[tuple[str, str]]]:
  """The image files of one class folder (sorted) and its other files; a folder inside it is an error."""
  with os.scandir(class_dir) as scan:
    entries = sorted((e for e in scan if not e.name.startswith('.')), key=lambda e: e.name)
  _require(bool(entries), f'dataset {spec!r}: class folder {class_dir} is empty',
           'put its images in it, or remove that class folder from every split (or domain)')
  folders = [e.name for e in entries if e.is_dir()]
  if folders:
    hint = '' if with_domains else f'; for the DIR/DOMAIN/CLASS layout write imagefolder:DIR:{DOMAINS_OPTION}'
    raise UserError(f'dataset {spec!r}: class folder {class_dir} holds folders ({", ".join(folders[:3])}), not '
                    'only images', f'put the images directly in the class folders{hint}')
  is_image = lambda entry: entry.name.lower().endswith(EXTENSIONS)
  others = [(e.path, f'not a {"/".join(EXTENSIONS)} file') for e in entries if not is_image(e)]
  return [e.path for e in entries if is_image(e)], others


# ----------------------------------------------------------------------------- checking files


def _probe_all(files, bad) -> tuple[dict[str, str | None], list[tuple[str, str]]]:
  """Every image's PIL mode (None when its header is bad), read on a few threads; the bad files, in order."""
  paths = [path for key in sorted(files) for path in files[key]]
  threads = max(1, min(_MAX_PROBE_THREADS, 4 * (os.cpu_count() or 1), len(paths)))
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    results = list(pool.map(probe, paths))
  modes = {path: mode for path, (mode, _) in zip(paths, results)}
  return modes, bad + [(path, reason) for path, (mode, reason) in zip(paths, results) if mode is None]


def probe(path: str) -> tuple[str | None, str | None]:
  """(PIL mode, None) for a PNG or JPEG whose header verifies, else (None, why not)."""
  try:
    with Image.open(path, formats=FORMATS) as image:
      mode = image.mode
      image.verify()
    return mode, None
  except Exception as e:  # pylint: disable=broad-except  # whatever PIL raises on a user's file means "unreadable"
    return None, _reason(e)


def _report_bad(spec: str, bad: list[tuple[str, str]], skip: bool) -> None:
  """Bad files: an error naming the first, or (skip) one line on stderr counting them."""
  if not bad:
    return
  path, reason = bad[0]
  count = f'{len(bad)} bad file{"s" if len(bad) > 1 else ""}'
  if not skip:
    raise SettingError('skip_bad_images', f'dataset {spec!r} has {count}, the first {path} ({reason})',
                       'true to skip and count them, or delete or replace the bad files')
  print(f'overfocus: dataset {spec!r}: skipped {count} (the first {path}: {reason})', file=sys.stderr, flush=True)


def _check_not_emptied(spec, roots, files) -> None:
  """A class folder whose every file was bad (and skipped) would leave a label without examples."""
  for (name, class_name), paths in files.items():
    _require(bool(paths), f'dataset {spec!r}: class folder {os.path.join(roots[name], class_name)} has no readable '
             'image', 'put readable .png/.jpg images in it, or remove that class folder from every split (or domain)')


# ----------------------------------------------------------------------------- splitting


def _split(files, roots, class_names, with_domains, seed: int) -> tuple[tuple, tuple]:
  """(paths, labels, domains) of train and test: the given split, or one seeded by ``seed`` per (domain, class)."""
  parts = {'train': ([], [], []), 'test': ([], [], [])}
  for (name, class_name), paths in sorted(files.items()):
    label, domain = class_names.index(class_name), list(roots).index(name)
    if name in ('train', 'test') and not with_domains:
      chosen = {name: paths}
    else:
      test = set(split_indices(len(paths), f'{name}/{class_name}' if name else class_name, seed).tolist())
      chosen = {'test': [p for i, p in enumerate(paths) if i in test],
                'train': [p for i, p in enumerate(paths) if i not in test]}
    for split, split_paths in chosen.items():
      parts[split][0].extend(split_paths)
      parts[split][1].extend([label] * len(split_paths))
      parts[split][2].extend([domain] * len(split_paths))
  if not with_domains:
    parts = {split: (paths, labels, None) for split, (paths, labels, _) in parts.items()}
  return parts['train'], parts['test']


def split_indices(count: int, group: str, seed: int = SPLIT_SEED) -> np.ndarray:
  """The test examples among `count` sorted files of one class folder: round(20%) of them, drawn by
  `np.random.default_rng([seed, crc32(group)])` where `group` is `CLASS` (or `DOMAIN/CLASS`), so adding a
  class or a domain leaves the others' split as it was."""
  rng = np.random.default_rng([seed, zlib.crc32(group.encode())])
  return np.sort(rng.permutation(count)[:int(count * TEST_FRACTION + 0.5)])


# ----------------------------------------------------------------------------- decoding


def decode(path: str, size: int, mode: str) -> np.ndarray:
  """The image at `path` as uint8 `(size, size, C)`: shorter side resized to `size`, centre crop."""
  try:
    with Image.open(path, formats=FORMATS) as image:
      image = image.convert(mode)
  except Exception as e:  # pylint: disable=broad-except  # a file that passed the header check may still be cut
    raise UserError(f'cannot decode image {path} ({_reason(e)})', 'delete or replace that file (loading checks '
                    'only headers, so a truncated image shows up when it is first read)') from None
  array = np.array(_fit(image, size), np.uint8)
  return array[..., None] if array.ndim == 2 else array


def _fit(image: Image.Image, size: int) -> Image.Image:
  """Resizes (bilinear) so that the shorter side is `size`, then crops the centre `size`×`size`."""
  width, height = image.size
  scale = size / min(width, height)
  new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
  if (new_w, new_h) != (width, height):
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return image.crop((left, top, left + size, top + size))


def _reason(error: Exception) -> str:
  """One short clause for an exception PIL or the OS raised."""
  text = ' '.join(str(error).split()) or type(error).__name__
  return text[:160]


def _require(condition: bool, problem: str, fix: str) -> None:
  if not condition:
    raise UserError(problem, fix)


def _read_only(array: np.ndarray) -> np.ndarray:
  array.setflags(write=False)
  return array
