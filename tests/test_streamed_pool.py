"""`jax-seqgcn select --images` streams the pool (issue 23): same picks, bounded images, no leftovers.

The eval pass decodes the folder batch by batch (`data.stream`) and keeps only the sampler's
fields (`experiment.embeddings.stream_pool`), memory-mapped when large. Compared here with the
in-memory pool of the code before (every image decoded by `folder.read_images`, then
`cycle.embed_pool`): equal fields bit for bit and equal picks, with and without the memmaps;
the memmaps removed after success and after failures; at most a few batches of decoded images
alive; Random decoding no pool image. Small folders (12x12 images), one-epoch learners.
"""

import csv
import gc
import threading
import weakref

import jax
import numpy as np
import pytest
from PIL import Image

import jax_seqgcn
from jax_seqgcn import training
from jax_seqgcn.apps import cli
from jax_seqgcn.apps import own_data
from jax_seqgcn.data import folder
from jax_seqgcn.data import stream
from jax_seqgcn.experiment import cycle
from jax_seqgcn.experiment import embeddings
from tests.conftest import TinyBN

NUM_IMAGES, NUM_LABELLED, EVAL_BATCH = 120, 24, 16
CLASSES = ("cat", "cow", "dog")


def image_id(i: int) -> str:
  return f"part{i % 3}/img{i:03d}.jpg" if i % 4 == 1 else f"img{i:03d}.png"


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
  """(folder of NUM_IMAGES 12x12 images, grayscale PNG and RGB JPEG, nested; sorted ids;
  labels CSV of every fifth image)."""
  root = tmp_path_factory.mktemp("streamed")
  rng = np.random.default_rng(0)
  for i in range(NUM_IMAGES):
    path = root / "images" / image_id(i)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels if i % 4 == 1 else pixels[..., 0]).save(path, quality=90)
  ids = folder.list_images(root / "images")
  with open(root / "labels.csv", "w", newline="") as f:
    csv.writer(f).writerows([("id", "label")] + [(ids[i], CLASSES[i % 3])
                                                 for i in range(0, NUM_IMAGES, 5)])
  return root, ids


@pytest.fixture(autouse=True)
def small_eval_batch(monkeypatch):
  """The eval pass in batches of EVAL_BATCH (256 would hold the whole test folder)."""
  real = own_data.images_config

  def config(**kwargs):
    result = real(**kwargs)
    result.train.eval_batch_size = EVAL_BATCH
    return result

  monkeypatch.setattr(own_data, "images_config", config)


def run_select(root, out, sampler="Entropy", *extra):
  return cli.main(["select", "--images", str(root / "images"), "--labels",
                   str(root / "labels.csv"), "--budget", "7", "--sampler", sampler,
                   "--epochs", "1", "--out", str(out), *map(str, extra)])


def record_pools(monkeypatch):
  """The pools `own_data.sample` is given, appended to the returned list."""
  pools = []
  real = own_data.sample

  def sample(sampler, key, pool, budget, options):
    pools.append(pool)
    return real(sampler, key, pool, budget, options)

  monkeypatch.setattr(own_data, "sample", sample)
  return pools


def in_memory_pool(setup, state, directory, node_ids, shape, labelled_mask, *, image_size=None,
                   allocate=None, stream=None):  # pylint: disable=redefined-outer-name
  """The pool as before the streaming: every image decoded at once, `cycle.embed_pool`."""
  del shape, allocate, stream
  images = folder.read_images(directory, node_ids, image_size=image_size)
  return cycle.embed_pool(setup, state, images, np.arange(len(node_ids)), labelled_mask)


def record_memmaps(monkeypatch):
  """The paths of the .npy files `ArrayStore` memory-maps, appended to the returned list."""
  paths = []
  real = np.lib.format.open_memmap

  def open_memmap(path, *args, **kwargs):
    paths.append(path)
    return real(path, *args, **kwargs)

  monkeypatch.setattr(np.lib.format, "open_memmap", open_memmap)
  return paths


def hidden_entries(root):
  return sorted(p.name for p in root.rglob(".*"))


@pytest.mark.parametrize("sampler, field, files", [
    ("Entropy", "probabilities", ["logits.npy", "probabilities.npy"]),
    ("CoreSet", "features", ["features.npy"])])
def test_streamed_selection_equals_the_in_memory_one(folder_data, tmp_path, monkeypatch, capsys,
                                                     sampler, field, files):
  root, _ = folder_data
  pools = record_pools(monkeypatch)
  assert run_select(root, tmp_path / "streamed.csv", sampler) == 0
  out = capsys.readouterr().out
  assert "reading images: 120/120 (headers)" in out
  assert f"embedding: {NUM_IMAGES}/{NUM_IMAGES} images" in out
  # Every array in memory below MEMMAP_BYTES; with 0 every one is a memory-mapped file.
  memmaps = record_memmaps(monkeypatch)
  monkeypatch.setattr(stream, "MEMMAP_BYTES", 0)
  assert run_select(root, tmp_path / "memmapped.csv", sampler) == 0
  assert [p.name for p in memmaps] == files
  assert isinstance(getattr(pools[1], field), np.memmap)
  assert not any(p.exists() or p.parent.exists() for p in memmaps)
  monkeypatch.setattr(embeddings, "folder_pool", in_memory_pool)
  assert run_select(root, tmp_path / "in_memory.csv", sampler) == 0
  streamed, memmapped, in_memory = pools
  assert not isinstance(getattr(streamed, field), np.memmap)
  for pool in (streamed, memmapped):
    np.testing.assert_array_equal(pool.labelled_mask, in_memory.labelled_mask)
    assert getattr(pool, field).dtype == getattr(in_memory, field).dtype
    np.testing.assert_array_equal(getattr(pool, field), getattr(in_memory, field))
  picks = (tmp_path / "in_memory.csv").read_text()
  assert (tmp_path / "streamed.csv").read_text() == picks
  assert (tmp_path / "memmapped.csv").read_text() == picks
  assert hidden_entries(tmp_path) == []  # no staging, no memmap folder, no lock left


@pytest.mark.parametrize("failure", ["broken pool image", "sampler"])
def test_memmaps_are_removed_after_a_failure(folder_data, tmp_path, monkeypatch, capsys,
                                             failure):
  root, ids = folder_data
  memmaps = record_memmaps(monkeypatch)
  monkeypatch.setattr(stream, "MEMMAP_BYTES", 0)
  images = tmp_path / "images"
  if failure == "broken pool image":
    # A copy of the folder whose last unlabelled PNG has a good header and broken pixels:
    # the scan passes it, the eval pass fails on it after the first batches were written.
    for id_ in ids:
      (images / id_).parent.mkdir(parents=True, exist_ok=True)
      (images / id_).write_bytes((root / "images" / id_).read_bytes())
    (tmp_path / "labels.csv").write_bytes((root / "labels.csv").read_bytes())
    last = max(i for i in range(NUM_IMAGES) if i % 5 and ids[i].endswith(".png"))
    broken = images / ids[last]
    broken.write_bytes(broken.read_bytes()[:60])  # IDAT cut short
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    assert run_select(tmp_path, tmp_path / "p.csv") == 2
    err = capsys.readouterr().err
    assert err.startswith("jax-seqgcn select: error: ") and err.count("\n") == 1, err
    assert f"{ids[last]}: not a readable PNG or JPEG image" in err
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before
  else:
    def sample(*args, **kwargs):
      raise RuntimeError("the sampler failed")

    monkeypatch.setattr(own_data, "sample", sample)
    with pytest.raises(RuntimeError, match="the sampler failed"):
      run_select(root, tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "p.workdir").exists()
  assert [p.name for p in memmaps][:1] == ["logits.npy"]
  assert not any(p.exists() or p.parent.exists() for p in memmaps)
  assert hidden_entries(tmp_path) == []


def test_pool_images_are_never_all_in_memory(folder_data, tmp_path, monkeypatch):
  """Decoded pool images alive (decoded by the prefetch threads and not yet freed) stay within
  the prefetch bound, far below the pool; each image is decoded once."""
  root, _ = folder_data
  lock, alive, peak, decoded = threading.Lock(), [0], [0], []
  real_decode = stream.decode_images

  def freed(count):
    with lock:
      alive[0] -= count

  def decode_images(directory, ids, *args, **kwargs):
    images = real_decode(directory, ids, *args, **kwargs)
    if threading.current_thread() is not threading.main_thread():  # not the labelled ones
      with lock:
        decoded.extend(ids)
        alive[0] += len(ids)
        peak[0] = max(peak[0], alive[0])
      weakref.finalize(images, freed, len(ids))
    return images

  monkeypatch.setattr(stream, "decode_images", decode_images)
  assert run_select(root, tmp_path / "p.csv") == 0
  assert sorted(decoded) == sorted(folder.list_images(root / "images"))  # each once
  gc.collect()
  assert alive[0] == 0
  assert peak[0] <= (stream.PREFETCH_BATCHES + 1) * EVAL_BATCH < NUM_IMAGES


def test_random_decodes_no_pool_image(folder_data, tmp_path, monkeypatch):
  root, _ = folder_data
  calls = []
  real_decode = stream.decode_images
  monkeypatch.setattr(stream, "decode_images",
                      lambda directory, ids, *a, **k: calls.append(len(ids)) or real_decode(
                          directory, ids, *a, **k))
  assert run_select(root, tmp_path / "p.csv", "Random") == 0
  assert calls == [NUM_IMAGES // 5]  # the labelled images, for the training


@pytest.mark.parametrize("sampler", ["BADGE", "LearningLoss", "VAAL"])
def test_stream_pool_equals_embed_pool_with_batch_norm(sampler):
  """A BatchNorm learner in eval mode: batches of two eval batches and a short last one give
  `embed_pool`'s fields bit for bit (600 nodes: XLA's softmax of a batch's rows and of all of
  them differ in the last bit, so it is taken over all of them); batches that are not whole
  eval batches are refused."""
  rng = np.random.default_rng(1)
  num = 600
  images = rng.integers(0, 256, (num, 8, 8, 3), dtype=np.uint8)
  setup = jax_seqgcn.make_setup(model=TinyBN(num_classes=10), sampler=sampler,
                                preprocessing="folder", eval_batch_size=32)
  state = training.init_train_state(jax.random.key(0), setup.model, (8, 8, 3), mesh=setup.mesh,
                                    loss_prediction=setup.fit_kwargs.get("loss_prediction"))
  # Running statistics that are not the identity, as after a training.
  state = state.replace(batch_stats=jax.tree.map(lambda x: x + 0.5, state.batch_stats))
  nodes = np.concatenate([np.arange(64, num), np.arange(64)])
  mask = np.arange(num) >= num - 64
  expected = cycle.embed_pool(setup, state, images, nodes, mask)
  batches = [(start, images[nodes[start:start + 64]]) for start in range(0, num, 64)]
  allocated = []

  def allocate(name, shape, dtype):
    allocated.append(name)
    return np.empty(shape, dtype)

  got = embeddings.stream_pool(setup, state, iter(batches), mask, allocate=allocate)
  stored = {"probabilities": ["logits", "probabilities"]}
  assert sorted(allocated) == sorted(sum((stored.get(f, [f]) for f in setup.sampler.needs), []))
  for field in jax_seqgcn.samplers.POOL_FIELDS:
    want = getattr(expected, field)
    assert (getattr(got, field) is None) == (want is None), field
    if want is not None:
      assert getattr(got, field).dtype == want.dtype
      np.testing.assert_array_equal(getattr(got, field), want)
  with pytest.raises(ValueError, match="multiple of 32"):
    embeddings.stream_pool(setup, state, iter([(0, images[:40]), (40, images[40:])]), mask)


def test_mc_dropout_pool_from_streamed_embeddings():
  """BALD's MC-dropout probabilities come from all N streamed embeddings at once, as before."""
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (20, 12, 12, 1), dtype=np.uint8)
  model = jax_seqgcn.get_learner("small_cnn", num_classes=3, channels=1, dropout_rate=0.3)
  setup = jax_seqgcn.make_setup(model=model, sampler="BALD", preprocessing="folder",
                                eval_batch_size=8, options={"bald_samples": 4})
  state = training.init_train_state(jax.random.key(0), model, (12, 12, 1), mesh=setup.mesh)
  mask = np.arange(20) < 9
  key = jax.random.key(5)
  expected = cycle.embed_pool(setup, state, images, np.arange(20), mask, key=key)
  got = embeddings.stream_pool(setup, state, [(0, images[:16]), (16, images[16:])], mask,
                               key=key)
  assert got.features is None and got.mc_probabilities.shape == (4, 20, 3)
  np.testing.assert_array_equal(got.mc_probabilities, expected.mc_probabilities)
  with pytest.raises(ValueError, match="needs MC-dropout predictions"):
    embeddings.stream_pool(setup, state, [], mask)  # no key


def test_scan_and_decode_read_as_read_images(folder_data, tmp_path):
  root, ids = folder_data
  directory = root / "images"
  shape = stream.scan_images(directory, ids)
  assert shape == (12, 12, 3)  # one RGB JPEG makes every image RGB
  whole = folder.read_images(directory, ids)
  np.testing.assert_array_equal(stream.decode_images(directory, ids[5:40], shape),
                                whole[5:40])
  resized = stream.scan_images(directory, ids, image_size=6)
  np.testing.assert_array_equal(stream.decode_images(directory, ids[:9], resized, image_size=6),
                                folder.read_images(directory, ids, image_size=6)[:9])
  gray = [i for i in ids if i.endswith(".png")]
  assert stream.scan_images(directory, gray) == (12, 12, 1)
  # The scan refuses what read_images refuses, in the same words, reading headers only.
  mixed = tmp_path / "mixed"
  mixed.mkdir()
  Image.new("L", (12, 12)).save(mixed / "a.png")
  Image.new("L", (10, 12)).save(mixed / "b.png")
  (mixed / "c.png").write_text("not an image")
  for names in (["a.png", "b.png"], ["a.png", "c.png"]):
    with pytest.raises(folder.InputError) as old:
      folder.read_images(mixed, names)
    with pytest.raises(folder.InputError) as new:
      stream.scan_images(mixed, names)
    assert str(new.value) == str(old.value)


def test_prefetch_order_errors_and_early_stop():
  seen = []

  def load(start, stop):
    seen.append(start)
    if start == 40:
      raise folder.InputError("broken")
    return np.arange(start, stop)

  batches = list(stream.prefetch(load, 25, 10, workers=2, ahead=2))
  assert [s for s, _ in batches] == [0, 10, 20]
  np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), np.arange(25))
  with pytest.raises(folder.InputError, match="broken"):
    list(stream.prefetch(load, 100, 10))
  seen.clear()
  first = stream.prefetch(load, 1000, 10, workers=1, ahead=2)
  assert next(first)[0] == 0
  first.close()  # the consumer stops: nothing more is started
  assert len(seen) <= 3


def test_array_store_memory_maps_large_arrays_and_removes_them(tmp_path):
  with stream.ArrayStore(tmp_path / "work", memmap_bytes=100) as store:
    small = store.allocate("small", (5, 5), np.float32)
    large = store.allocate("large", (10, 5), np.float32)
    assert not isinstance(small, np.memmap) and isinstance(large, np.memmap)
    large[:] = 1.0
    assert store.files["large"].is_file() and store.files["large"].parent.name.startswith(
        ".pool-arrays-")
  assert list((tmp_path / "work").iterdir()) == []
  with pytest.raises(RuntimeError):
    with stream.ArrayStore(tmp_path / "work", memmap_bytes=0) as store:
      store.allocate("x", (3,), np.int64)
      raise RuntimeError("failed")
  assert list((tmp_path / "work").iterdir()) == []
