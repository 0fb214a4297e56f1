"""Tests for `imagefolder:DIR[:SIZE][:domains]` (overfocus_jax/data/imagefolder.py) on tiny generated folders.

Every image of class k (k-th in sorted order) is one flat colour (40k + 20, 235 - 40k, 7), so a decoded pixel names
the label it must carry: a wrong label cannot pass silently.
"""

import io
import zlib

import numpy as np
import PIL.Image
import pytest

from conftest import BASE_RUN_ARGS, REPO_ROOT, assert_one_line_error, last_json_line, read_metrics, run_cli
from overfocus_jax import config as config_lib
from overfocus_jax.data import imagefolder, imagenet, pipeline
from overfocus_jax.data.sources import load_dataset
from overfocus_jax.errors import SettingError, UserError

THREE = {"cat": 4, "dog": 4, "fish": 4}


def colour(label: int, mode: str = "RGB"):
  value = 40 * label + 20
  return value if mode == "L" else (value, 255 - value, 7)


def write_image(path, label=0, *, mode="RGB", size=(8, 8)):
  """A flat image of `label`'s colour; the format follows the extension."""
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.new(mode, size, colour(label, mode)).save(path)
  return path


def make_classes(directory, counts, *, ext="png", mode="RGB"):
  """`directory/CLASS/000.ext ...`, `counts[CLASS]` images per class; returns `directory`."""
  for label, name in enumerate(sorted(counts)):
    for i in range(counts[name]):
      write_image(directory / name / f"{i:03d}.{ext}", label, mode=mode)
  directory.mkdir(parents=True, exist_ok=True)
  return directory


def make_split_folder(root, train=THREE, test=None):
  make_classes(root / "train", train)
  make_classes(root / "test", test or {name: 2 for name in train})
  return root


def assert_labels_match_pixels(source, mode="RGB"):
  """Every example's pixels are its label's colour (exactly: PNGs are lossless, flat colours resize to themselves)."""
  for i in range(len(source)):
    image, label = source[i]
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image[0, 0], np.atleast_1d(colour(label, mode)))


def cli_error(capsys, tmp_path, spec, *fragments):
  """`overfocus train` on `spec` ends in one line on stderr naming each fragment."""
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "run", *BASE_RUN_ARGS, f"--config.dataset={spec}")
  assert_one_line_error(code, err, *fragments)
  return err


# ----------------------------------------------------------------------------- the three layouts


def test_train_test_layout_labels_and_shapes(tmp_path):
  root = make_split_folder(tmp_path / "pets")
  (root / ".DS_Store").write_bytes(b"\0junk")  # dot-files are ignored everywhere
  (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0junk")
  (root / "README.txt").write_text("files beside the split folders are not examples")
  ds = load_dataset(f"imagefolder:{root}:16")
  assert (len(ds.train), len(ds.test)) == (12, 6)
  assert ds.image_shape == (16, 16, 3) and ds.num_classes == 3 and ds.natural_images
  assert ds.class_names == ("cat", "dog", "fish") and ds.domain_names == () and ds.train.domains is None
  assert ds.mean == imagenet.IMAGENET_MEAN and ds.std == imagenet.IMAGENET_STD
  image, label = ds.test[0]
  assert image.shape == (16, 16, 3) and isinstance(label, int)
  assert sorted(np.bincount(ds.train.labels)) == [4, 4, 4]
  assert_labels_match_pixels(ds.train)
  assert_labels_match_pixels(ds.test)


def test_val_folder_is_the_test_split_and_size_defaults_to_64(tmp_path):
  make_classes(tmp_path / "d" / "train", {"a": 2, "b": 2})
  make_classes(tmp_path / "d" / "val", {"a": 1, "b": 1})
  ds = load_dataset(f"imagefolder:{tmp_path / 'd'}")
  assert (len(ds.train), len(ds.test)) == (4, 2) and ds.image_shape == (64, 64, 3)
  assert_labels_match_pixels(ds.test)


def test_image_size_sets_the_side_when_the_spec_gives_none(tmp_path):
  root = make_split_folder(tmp_path / "pets")
  assert load_dataset(f"imagefolder:{root}", image_size=20).image_shape == (20, 20, 3)
  assert load_dataset(f"imagefolder:{root}:20", image_size=20).image_shape == (20, 20, 3)
  with pytest.raises(SettingError, match=r"image_size=16 and dataset .*:20' give different image sizes") as error:
    load_dataset(f"imagefolder:{root}:20", image_size=16)
  assert error.value.setting == "image_size" and "drop :20 from the dataset" in str(error.value)
  assert load_dataset("digits", image_size=0).image_shape == (8, 8, 1)


@pytest.mark.parametrize("fields, fragments", [
    (["--config.image_size=32"], ["config.image_size=32 resizes imagefolder: datasets only", "'mnist5k'",
                                  "--config.image_size=0"]),
    (["--config.image_size=-1", "--config.dataset=imagefolder:x"], ["config.image_size=-1", "0..4096"]),
])
def test_bad_image_size_is_one_line(tmp_path, capsys, fields, fragments):
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "run", *fields)
  assert_one_line_error(code, err, *fragments)
  assert not (tmp_path / "run").exists()


def test_flat_layout_seeded_split_is_deterministic(tmp_path):
  root = make_classes(tmp_path / "flat", {"a": 10, "b": 10})
  first, second = (load_dataset(f"imagefolder:{root}:8") for _ in range(2))
  assert (len(first.train), len(first.test)) == (16, 4)  # 20% of each class folder
  assert first.test.paths == second.test.paths and first.train.paths == second.train.paths
  assert sorted(np.bincount(first.test.labels)) == [2, 2]
  assert not set(first.test.paths) & set(first.train.paths)
  expected = [str(root / "a" / f"{i:03d}.png") for i in imagefolder.split_indices(10, "a")]
  assert [p for p in first.test.paths if "/a/" in p] == expected
  assert_labels_match_pixels(first.train)
  # A new class leaves the split of the others as it was.
  make_classes(tmp_path / "more", {"a": 10, "b": 10, "c": 10})
  grown = load_dataset(f"imagefolder:{tmp_path / 'more'}:8")
  assert [p.split("/")[-2:] for p in grown.test.paths[:4]] == [p.split("/")[-2:] for p in first.test.paths]


def test_split_indices_take_a_fifth_with_the_documented_seed():
  picked = imagefolder.split_indices(10, "dog")
  rng = np.random.default_rng([0, zlib.crc32(b"dog")])
  np.testing.assert_array_equal(picked, np.sort(rng.permutation(10)[:2]))
  assert len(imagefolder.split_indices(1, "x")) == 0 and len(imagefolder.split_indices(3, "x")) == 1


def test_domainbed_layout_exposes_each_examples_domain(tmp_path):
  root = tmp_path / "pacs"
  for domain in ("photo", "art_painting", "sketch"):
    make_classes(root / domain, {"dog": 5, "horse": 5})
  ds = load_dataset(f"imagefolder:{root}:domains:8")
  assert ds.domain_names == ("art_painting", "photo", "sketch") == ds.train.domain_names
  assert ds.class_names == ("dog", "horse") and ds.image_shape == (8, 8, 3)
  assert (len(ds.train), len(ds.test)) == (24, 6)
  for source in (ds.train, ds.test):
    assert source.domains.shape == (len(source),) and not source.domains.flags.writeable
    for path, domain in zip(source.paths, source.domains):
      assert path.split("/")[-3] == ds.domain_names[domain]
    assert_labels_match_pixels(source)
  assert sorted(np.bincount(ds.test.domains)) == [2, 2, 2]  # every domain split 80/20 on its own
  assert load_dataset(f"imagefolder:{root}:8:domains").test.paths == ds.test.paths  # options in either order
  resplit = load_dataset(f"imagefolder:{root}:domains:8", trial_seed=1)  # DomainBed's --trial_seed
  assert resplit.test.paths != ds.test.paths and sorted(np.bincount(resplit.test.domains)) == [2, 2, 2]
  assert sorted(resplit.train.paths + resplit.test.paths) == sorted(ds.train.paths + ds.test.paths)


def test_domainbed_layout_without_the_option_is_an_error(tmp_path):
  root = tmp_path / "pacs"
  make_classes(root / "photo", {"dog": 2})
  with pytest.raises(UserError, match="holds folders.*imagefolder:DIR:domains"):
    load_dataset(f"imagefolder:{root}")


def test_domains_option_on_a_split_folder_is_an_error(tmp_path):
  root = make_split_folder(tmp_path / "pets")
  with pytest.raises(UserError, match="not domains; drop :domains"):
    load_dataset(f"imagefolder:{root}:domains")


# ----------------------------------------------------------------------------- formats and channels


def test_jpeg_files_of_every_spelling(tmp_path):
  root = tmp_path / "jpegs"
  for label, name in enumerate(("a", "b")):
    for i, ext in enumerate(("jpg", "jpeg", "JPG", "png")):
      write_image(root / name / f"{i}.{ext}", label, size=(12, 8))
  ds = load_dataset(f"imagefolder:{root}:8")
  assert len(ds.train) + len(ds.test) == 8
  for i in range(len(ds.train)):
    image, label = ds.train[i]
    assert image.shape == (8, 8, 3)
    assert np.abs(image.astype(int) - colour(label)).max() <= 4  # JPEG is lossy


def test_all_greyscale_folder_is_one_channel_and_mixed_is_rgb(tmp_path):
  grey = make_classes(tmp_path / "grey", {"a": 3, "b": 3}, mode="L")
  ds = load_dataset(f"imagefolder:{grey}:8")
  assert ds.image_shape == (8, 8, 1)
  assert ds.mean == imagenet.IMAGENET_GREY_MEAN and ds.std == imagenet.IMAGENET_GREY_STD
  assert ds.train[0][0].shape == (8, 8, 1)
  assert_labels_match_pixels(ds.train, mode="L")
  write_image(grey / "a" / "colour.png", 0)
  mixed = load_dataset(f"imagefolder:{grey}:8")
  assert mixed.image_shape == (8, 8, 3) and mixed.train[0][0].shape == (8, 8, 3)


def test_resize_keeps_the_aspect_and_crops_the_centre():
  strip = np.zeros((16, 32, 3), np.uint8)
  strip[:, :8], strip[:, 8:24], strip[:, 24:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
  fitted = np.asarray(imagefolder._fit(PIL.Image.fromarray(strip), 8))  # pylint: disable=protected-access
  assert fitted.shape == (8, 8, 3)
  np.testing.assert_array_equal(fitted[:, 1:-1], np.broadcast_to((0, 255, 0), (8, 6, 3)))
  assert imagefolder._fit(PIL.Image.new("RGB", (5, 3)), 6).size == (6, 6)  # pylint: disable=protected-access


def test_the_pipeline_decodes_in_its_threads(tmp_path):
  ds = load_dataset(f"imagefolder:{make_split_folder(tmp_path / 'pets')}:8")
  batch = next(pipeline.make_train_iterator(ds, batch_size=4, seed=0, augment=True, normalized=False))
  assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.uint8
  images, labels = pipeline.read_split(ds.test)
  assert images.shape == (6, 8, 8, 3) and list(labels) == list(ds.test.labels)


def test_grain_worker_processes_decode_the_same_batches(tmp_path):
  ds = load_dataset(f"imagefolder:{make_split_folder(tmp_path / 'pets')}:8")
  make = lambda workers: pipeline.make_train_iterator(ds, batch_size=4, seed=1, augment=True, normalized=False,
                                                      workers=workers)
  threads, workers = make(0), make(1)
  try:
    for _ in range(4):  # past an epoch's end (3 batches)
      expected, got = next(threads), next(workers)
      np.testing.assert_array_equal(got["image"], expected["image"])
      np.testing.assert_array_equal(got["label"], expected["label"])
  finally:
    workers.close()


# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize("suffix, message", [
    (":0", "not in 1..4096"), (":5000", "not in 1..4096"), (":8:16", "two image sizes"),
    (":domains:domains", "repeats :domains"), ("/missing", "does not exist"),
])
def test_bad_specs(tmp_path, suffix, message):
  make_split_folder(tmp_path / "pets")
  with pytest.raises(UserError, match=message):
    load_dataset(f"imagefolder:{tmp_path / 'pets'}{suffix}")


@pytest.mark.parametrize("spec", ["imagefolder:", "imagefolder::16", "imagefolder: :domains"])
def test_spec_without_a_directory(spec):
  with pytest.raises(UserError, match="missing its argument|names no directory"):
    load_dataset(spec)


# ----------------------------------------------------------------------------- bad folders and files, via the CLI


def corrupt_png(root):
  (root / "train" / "dog" / "broken.png").write_bytes(b"not a png at all")
  return root / "train" / "dog" / "broken.png"


def truncated_png(root):
  path = root / "train" / "dog" / "cut.png"
  buffer = io.BytesIO()
  PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(buffer, "PNG")
  path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  return path


def gif_named_png(root):
  path = root / "train" / "dog" / "animated.png"
  PIL.Image.new("RGB", (8, 8)).save(path, "GIF")  # only the PNG and JPEG decoders may read these files
  return path


def text_file(root):
  (root / "test" / "cat" / "notes.txt").write_text("not an image")
  return root / "test" / "cat" / "notes.txt"


def stray_image(root):
  return write_image(root / "train" / "loose.png")


@pytest.mark.parametrize("make_bad", [corrupt_png, truncated_png, gif_named_png, text_file, stray_image])
def test_bad_file_is_a_one_line_error_naming_it(tmp_path, capsys, make_bad):
  root = make_split_folder(tmp_path / "pets")
  path = make_bad(root)
  cli_error(capsys, tmp_path, f"imagefolder:{root}:8", str(path), "1 bad file", "--config.skip_bad_images")


def test_bad_folders_are_one_line_errors(tmp_path, capsys):
  root = make_split_folder(tmp_path / "pets")
  (root / "train" / "cow").mkdir()
  (root / "test" / "cow").mkdir()
  cli_error(capsys, tmp_path, f"imagefolder:{root}:8", f"class folder {root / 'train' / 'cow'} is empty")
  (tmp_path / "empty").mkdir()
  cli_error(capsys, tmp_path, f"imagefolder:{tmp_path / 'empty'}", f"{tmp_path / 'empty'} holds no folders")
  cli_error(capsys, tmp_path, f"imagefolder:{tmp_path / 'nowhere'}", f"{tmp_path / 'nowhere'} does not exist")
  make_classes(tmp_path / "only_train" / "train", {"a": 1})
  cli_error(capsys, tmp_path, f"imagefolder:{tmp_path / 'only_train'}", "has train/ but no test/")
  make_classes(tmp_path / "only_test" / "test", {"a": 1})
  cli_error(capsys, tmp_path, f"imagefolder:{tmp_path / 'only_test'}", "has test/ but no train/")
  (tmp_path / "no_classes" / "train").mkdir(parents=True)
  (tmp_path / "no_classes" / "test").mkdir()
  cli_error(capsys, tmp_path, f"imagefolder:{tmp_path / 'no_classes'}", "train holds no class folders")


def test_class_sets_that_differ_are_named(tmp_path, capsys):
  root = tmp_path / "pets"
  make_classes(root / "train", {"cat": 1, "dog": 1, "emu": 1})
  make_classes(root / "test", {"cat": 1, "fox": 1})
  cli_error(capsys, tmp_path, f"imagefolder:{root}", f"{root / 'test'} lacks dog, emu", f"{root / 'train'} lacks fox")
  for domain, classes in (("art", {"a": 1, "b": 1}), ("photo", {"a": 1})):
    make_classes(tmp_path / "dg" / domain, classes)
  cli_error(capsys, tmp_path, f"imagefolder:{tmp_path / 'dg'}:domains", f"{tmp_path / 'dg' / 'photo'} lacks b")


def test_undecodable_pixels_are_a_one_line_error_when_read(tmp_path):
  root = make_split_folder(tmp_path / "pets")
  buffer = io.BytesIO()
  PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(buffer, "JPEG")
  path = root / "test" / "cat" / "cut.jpg"
  path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) * 2 // 3])  # its header still verifies
  ds = load_dataset(f"imagefolder:{root}:8")
  with pytest.raises(UserError, match=f"cannot decode image {path} .*delete or replace") as caught:
    pipeline.read_split(ds.test)
  assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- skip_bad_images


def test_skip_bad_images_leaves_them_out_and_counts_them(tmp_path, capsys):
  root = make_split_folder(tmp_path / "pets")
  corrupt_png(root), text_file(root), stray_image(root)
  with pytest.raises(SettingError, match="3 bad files, the first"):
    load_dataset(f"imagefolder:{root}:8")
  capsys.readouterr()
  ds = load_dataset(f"imagefolder:{root}:8", skip_bad_images=True)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "skipped 3 bad files" in err[0]
  assert (len(ds.train), len(ds.test)) == (12, 6)
  assert_labels_match_pixels(ds.train)
  assert_labels_match_pixels(ds.test)


def test_skip_bad_images_still_refuses_a_class_left_empty(tmp_path):
  root = make_split_folder(tmp_path / "pets")
  for path in (root / "test" / "dog").iterdir():
    path.write_bytes(b"garbage")
  with pytest.raises(UserError, match=f"class folder {root / 'test' / 'dog'} has no readable image"):
    load_dataset(f"imagefolder:{root}:8", skip_bad_images=True)


def test_skip_bad_images_is_a_boolean_config_field(tmp_path, capsys):
  assert config_lib.load_config_file(config_lib.default_config_path()).skip_bad_images is False
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "run", "--config.skip_bad_images=maybe")
  assert_one_line_error(code, err, "--config.skip_bad_images='maybe'", "expected true or false")


# ----------------------------------------------------------------------------- end to end


def test_train_one_epoch_on_an_image_folder(tmp_path, capsys):
  """With a bad file skipped (--config.skip_bad_images=true reaches the loader), and the host stream chosen by
  data_on_device=auto: an image folder is decoded in grain's threads, never all at once."""
  root = make_split_folder(tmp_path / "pets", train={"cat": 6, "dog": 6, "fish": 4})
  corrupt_png(root)
  code, out, err = run_cli(capsys, "train", "--workdir", tmp_path / "run", *BASE_RUN_ARGS, "--config.num_epochs=1",
                           f"--config.dataset=imagefolder:{root}", "--config.image_size=12", "--config.batch_size=8",
                           "--config.eval_batch_size=8", "--config.skip_bad_images=true")
  assert code == 0, err
  assert "skipped 1 bad file" in err
  summary = last_json_line(out)
  assert summary["dataset"] == f"imagefolder:{root}" and summary["data_on_device"] is False
  assert 0 <= summary["test_accuracy"] <= 1
  # Another folder without a :SIZE is evaluated at the run's 12 pixels; one at another size is refused.
  other = make_split_folder(tmp_path / "more", train={"cat": 1, "dog": 1, "fish": 1})
  code, out, err = run_cli(capsys, "eval", "--workdir", tmp_path / "run", "--dataset", f"imagefolder:{other}")
  assert code == 0, err
  assert last_json_line(out)["dataset"] == f"imagefolder:{other}"
  code, _, err = run_cli(capsys, "eval", "--workdir", tmp_path / "run", "--dataset", f"imagefolder:{other}:16")
  last = err.strip().splitlines()[-1]  # after the run's own folder's skipped-file notice
  assert code == 2 and "Traceback" not in err and "(16, 16, 3) images" in last and "(12, 12, 3)" in last


def test_train_on_domains_with_one_held_out(tmp_path, capsys):
  """DomainBed on an image folder: `sketch` held out, balanced batches over the two others (4 each), every domain's
  in- and out-split accuracy logged, test_accuracy the held-out domain's in-split."""
  root = tmp_path / "pacs"
  for domain in ("photo", "art_painting", "sketch"):
    make_classes(root / domain, {"dog": 5, "horse": 5})
  code, out, err = run_cli(capsys, "train", "--workdir", tmp_path / "run", *BASE_RUN_ARGS, "--config.num_epochs=1",
                           f"--config.dataset=imagefolder:{root}:domains:8", "--config.batch_size=8",
                           "--config.eval_batch_size=8", "--config.environments.test_envs=2",
                           "--config.environments.trial_seed=1")
  assert code == 0, err
  summary = last_json_line(out)
  assert summary["test_envs"] == [2] and summary["test_accuracy"] == summary["env2_in_acc"]
  assert summary["steps"] == 2  # two training domains of 8 in-split images each, 4 of each per batch of 8
  record = read_metrics(tmp_path / "run")[-1]
  for i in range(3):
    assert 0 <= record[f"env{i}_in_acc"] <= 1 and 0 <= record[f"env{i}_out_acc"] <= 1


def test_make_imagefolder_writes_the_datasets_pixels(tmp_path):
  """experiments/make_imagefolder.py: digits 3, 5 and 7, two per class and split; read back, the same pixels."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("make_imagefolder", REPO_ROOT / "experiments" / "make_imagefolder.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  assert script.main([str(tmp_path / "f"), "--dataset", "digits", "--classes", "3", "5", "7", "--per-class", "2"]) == 0
  folder, digits = load_dataset(f"imagefolder:{tmp_path / 'f'}:8"), load_dataset("digits")
  assert folder.class_names == ("3", "5", "7") and (len(folder.train), len(folder.test)) == (6, 6)
  for split in ("train", "test"):
    source, original = getattr(folder, split), getattr(digits, split)
    for label, digit in enumerate((3, 5, 7)):
      rows = np.flatnonzero(original.labels == digit)[:2]
      mine = [source[i][0] for i in range(len(source)) if source[i][1] == label]
      np.testing.assert_array_equal(np.stack(mine), original.images[rows])
  assert script.main([str(tmp_path / "g"), "--dataset", "digits", "--classes", "12"]) == 2
