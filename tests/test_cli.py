"""End-to-end tests of `jax-seqgcn select` on real Fashion-MNIST written as PNG/JPEG files."""

import configparser
import csv
import importlib
import pathlib
import shutil
import subprocess

import jax
import numpy as np
import pytest
from PIL import Image

from jax_seqgcn import data
from jax_seqgcn import samplers
from jax_seqgcn import selection
from jax_seqgcn.apps import cli
from jax_seqgcn.apps import own_data
from jax_seqgcn.experiment import cycle
from jax_seqgcn.experiment import workdir as workdir_lib
from tests.conftest import ROOT
from tests.conftest import run_python
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
         "Bag", "Ankle boot"]  # any strings: a slash, a space
NUM_IMAGES, NUM_LABELLED = 300, 40


@pytest.fixture(scope="module")
def fmnist():
  """The first NUM_IMAGES real Fashion-MNIST training images [N, 28, 28, 1] and labels."""
  try:
    dataset = data.load_fashion_mnist_idx()
  except data.DatasetNotFoundError as err:
    pytest.fail(f"{err}")
  return dataset.train_images[:NUM_IMAGES], dataset.train_targets[:NUM_IMAGES]


def image_id(i: int) -> str:
  """Nested folders, some JPEG."""
  if i % 3 == 0:
    return f"batch{i % 2}/deeper/img{i:04d}.png"
  return f"batch{i % 2}/img{i:04d}.jpg" if i % 10 == 1 else f"img{i:04d}.png"


def write_folder(directory: pathlib.Path, images, count=NUM_IMAGES):
  for i in range(count):
    path = directory / image_id(i)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(images[i, ..., 0]).save(path, quality=95)
  return [image_id(i) for i in range(count)]


def write_labels(path: pathlib.Path, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "label"])
    writer.writerows(rows)


def read_picks(path):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return rows[0], [row[1] for row in rows[1:]], rows[1:]


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory, fmnist):
  """(DIR with NUM_IMAGES images, their ids, labels CSV text rows of the first NUM_LABELLED)."""
  images, targets = fmnist
  directory = tmp_path_factory.mktemp("fmnist") / "images"
  ids = write_folder(directory, images)
  return directory, ids, targets


def select(*args) -> int:
  return cli.main(["select", *map(str, args)])


def files_under(path: pathlib.Path):
  return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


def test_images_round_trip(tmp_path, folder_data, capsys):
  directory, ids, targets = folder_data
  labels = tmp_path / "labels.csv"
  write_labels(labels, [(ids[i], NAMES[targets[i]]) for i in range(NUM_LABELLED)])
  common = ["--images", directory, "--labels", labels, "--budget", 20, "--epochs", 2,
            "--batch_size", 32]
  assert select(*common, "--sampler", "Entropy", "--out", tmp_path / "picks.csv") == 0
  out = capsys.readouterr().out
  assert "reading images: 300/300" in out and "train epoch 2/2" in out
  assert "sampling: Entropy on 300 images (260 unlabelled), 20 picks" in out
  header, picks, rows = read_picks(tmp_path / "picks.csv")
  assert header == ["rank", "id", "score"]
  assert [int(r[0]) for r in rows] == list(range(1, 21))
  assert len(set(picks)) == 20 and set(picks) <= set(ids[NUM_LABELLED:])
  scores = np.array([float(r[2]) for r in rows])
  assert np.all(np.diff(scores) <= 0) and 0 <= scores.min() and scores.max() <= np.log(10)

  # The workdir: the trained learner, class names, resolved config, picks.
  workdir = tmp_path / "picks.workdir"
  model, variables, record = own_data.load_learner(workdir)
  assert record["classes"] == sorted(NAMES) and record["picks"] == picks
  assert record["image_shape"] == [28, 28, 1] and len(record["ids"]) == NUM_IMAGES
  assert (workdir / "picks.csv").read_text() == (tmp_path / "picks.csv").read_text()
  config = workdir_lib.read_config(workdir)
  assert config["sampler"]["name"] == "Entropy" and config["al"]["whole_pool"]
  assert config["learner"]["name"] == "small_cnn" and config["train"]["epochs"] == 2
  x = np.stack([np.asarray(Image.open(directory / p)) for p in picks[:4]])[..., None] / 255.0
  logits = model.apply(variables, x.astype(np.float32), train=False)[0]
  assert logits.shape == (4, 10)
  # Entropy of the reloaded learner's softmax is the score column.
  p = jax.nn.softmax(logits)
  np.testing.assert_allclose(-np.sum(p * np.log(p), axis=1), scores[:4], rtol=1e-3)

  # Label the picks from the true labels, select again: new picks, none labelled.
  with open(labels, "a", newline="") as f:
    csv.writer(f).writerows([(pid, NAMES[targets[ids.index(pid)]]) for pid in picks])
  assert select(*common, "--sampler", "CoreGCN", "--option", "steps=20",
                "--out", tmp_path / "picks2.csv") == 0
  header, picks2, _ = read_picks(tmp_path / "picks2.csv")
  assert header == ["rank", "id"]  # k-center order, no per-pick score
  labelled = set(ids[:NUM_LABELLED]) | set(picks)
  assert len(set(picks2)) == 20 and set(picks2) <= set(ids) and not set(picks2) & labelled
  assert (tmp_path / "picks2.workdir" / "checkpoints").is_dir()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_features_round_trip_equals_the_sampler(tmp_path, fmnist):
  images, targets = fmnist
  features = images.reshape(NUM_IMAGES, -1).astype(np.float32) / 255.0
  np.save(tmp_path / "features.npy", features)
  labels = tmp_path / "labels.csv"
  labelled = list(range(NUM_LABELLED))
  write_labels(labels, [(i, NAMES[targets[i]]) for i in labelled])
  args = ["--features", tmp_path / "features.npy", "--labels", labels, "--budget", 15]
  assert select(*args, "--sampler", "CoreSet", "--seed", 3, "--out", tmp_path / "a.csv") == 0
  header, picks, _ = read_picks(tmp_path / "a.csv")
  mask = np.arange(NUM_IMAGES) < NUM_LABELLED
  direct = samplers.get_sampler("CoreSet")(jax.random.key(3), samplers.Pool(mask,
                                                                            features=features), 15)
  assert header == ["rank", "id"] and [int(p) for p in picks] == np.asarray(direct).tolist()

  # Label them; UncertainGCN (with an option) on the .npz form picks new rows.
  with open(labels, "a", newline="") as f:
    csv.writer(f).writerows([(p, NAMES[targets[int(p)]]) for p in picks])
  np.savez(tmp_path / "features.npz", features=features)
  args[1] = tmp_path / "features.npz"
  assert select(*args, "--sampler", "UncertainGCN", "--option", "steps=30",
                "--out", tmp_path / "b.csv") == 0
  header, picks2, rows = read_picks(tmp_path / "b.csv")
  mask[[int(p) for p in picks]] = True
  key = jax.random.key(0)
  direct = samplers.uncertain_gcn(key, features, mask, 15, steps=30)
  assert header == ["rank", "id", "score"]
  assert [int(p) for p in picks2] == np.asarray(direct).tolist()
  assert not {int(p) for p in picks2} & set(np.flatnonzero(mask).tolist())
  gcn_scores = selection.train_gcn(key, features, mask, steps=30).scores
  np.testing.assert_allclose([float(r[2]) for r in rows], np.asarray(gcn_scores)[direct],
                             rtol=1e-6)

  # --force replaces the picks; without it an existing file is refused.
  assert select(*args, "--sampler", "Random", "--out", tmp_path / "b.csv") == 2
  assert read_picks(tmp_path / "b.csv")[1] == picks2
  assert select(*args, "--sampler", "Random", "--out", tmp_path / "b.csv", "--force") == 0
  assert read_picks(tmp_path / "b.csv")[0] == ["rank", "id"]


@pytest.fixture
def small(tmp_path, fmnist, monkeypatch):
  """A 30-image folder and a labels CSV of 10 of them; training is forbidden."""
  monkeypatch.setattr(cycle, "train_learner", lambda *a, **k: pytest.fail("training started"))
  images, targets = fmnist
  directory = tmp_path / "images"
  ids = write_folder(directory, images, 30)
  write_labels(tmp_path / "labels.csv", [(ids[i], NAMES[targets[i]]) for i in range(10)])
  np.save(tmp_path / "features.npy", images[:30].reshape(30, -1) / 255.0)
  write_labels(tmp_path / "rows.csv", [(i, NAMES[targets[i]]) for i in range(10)])
  return tmp_path, ids


def _corrupt(path):
  path.write_bytes(path.read_bytes()[:60])


# (what to break, extra args, message parts). `images` / `features` runs choose the input form.
BAD_INPUTS = [
    ("text", "images", [], ["notes.txt", "not a readable PNG or JPEG image"]),
    ("truncated", "images", [], ["img0002.png", "not a readable PNG or JPEG image"]),
    ("gif", "images", [], ["anim.gif", "a GIF image; only PNG and JPEG"]),
    ("sizes", "images", [], ["img0004.png is 20x20", "img0000.png is 28x28",
                             "--image_size S"]),
    ("missing id", "images", [], ["labels.csv line 4", "'img0099.png' is not an image file"]),
    ("duplicate id", "images", [], ["labels.csv line 12", "labelled twice (first on line 2)"]),
    ("one class", "images", [], ["labels.csv", "only the class 'Bag'", "at least two"]),
    ("header", "images", [], ["labels.csv line 1", "header must be 'id,label'"]),
    ("empty label", "images", [], ["labels.csv line 3", "non-empty id and label"]),
    ("budget", "images", ["--budget", 21], ["budget 21 is larger than the 20 unlabelled"]),
    ("budget", "images", ["--budget", 0], ["--budget: must be a positive integer"]),
    ("out exists", "images", [], ["picks.csv exists; pass --force"]),
    ("out is labels", "images", [], ["would overwrite the labels file"]),
    ("option", "images", ["--option", "nope=1"], ["unknown option(s) ['nope']"]),
    ("option", "images", ["--option", "s_margin=2"], ["s_margin must be a number in [0, 1]"]),
    ("sampler", "images", ["--sampler", "Coreset"], ["unknown sampler 'Coreset'"]),
    ("tiny images", "images", ["--image_size", 2], ["small_cnn", "4"]),
    ("nan", "features", [], ["features.npy: NaN or inf in 1 row(s), first at rows [3]"]),
    ("rank", "features", [], ["features.npy", "must be [N, D] (rank 2)"]),
    ("row out of range", "features", [], ["rows.csv line 3", "id 30 is out of range"]),
    ("row not an index", "features", [], ["rows.csv line 2", "'a.png' is not a row index"]),
    ("needs a learner", "features", ["--sampler", "Entropy"],
     ["sampler Entropy needs probabilities, which a features file does not give",
      "--images DIR", "CoreSet"]),
    ("needs a learner", "features", ["--sampler", "VAAL"], ["sampler VAAL needs images,"]),
    ("workdir with features", "features", ["--workdir", "w"], ["--workdir", "only apply with"]),
    ("epochs with features", "features", ["--epochs", 3], ["--epochs only apply with --images"]),
    ("foreign workdir", "images", ["--force"],
     ["other exists and is not a workdir of jax-seqgcn select", "even with --force"]),
    ("workdir holds the inputs", "images", ["--force"], ["the workdir would hold --out"]),
]


@pytest.mark.parametrize("case, form, extra, parts", BAD_INPUTS)
def test_bad_input_is_one_clear_error_and_writes_nothing(small, capsys, case, form, extra,
                                                        parts):
  tmp_path, ids = small
  images_dir, labels = tmp_path / "images", tmp_path / "labels.csv"
  out = tmp_path / "picks.csv"
  if case == "text":
    (images_dir / "notes.txt").write_text("not an image")
  elif case == "truncated":
    _corrupt(images_dir / "img0002.png")
  elif case == "gif":
    Image.new("L", (28, 28)).save(images_dir / "batch1" / "anim.gif")
  elif case == "sizes":
    Image.new("L", (20, 20)).save(images_dir / "img0004.png")
  elif case == "missing id":
    labels.write_text(labels.read_text().replace(ids[2], "img0099.png"))
  elif case == "duplicate id":
    labels.write_text(labels.read_text() + f"./{ids[0]},Bag\n")
  elif case == "one class":
    write_labels(labels, [(ids[i], "Bag") for i in range(10)])
  elif case == "header":
    labels.write_text("path,class\n" + labels.read_text().split("\n", 1)[1])
  elif case == "empty label":
    lines = labels.read_text().splitlines()
    lines[2] = ids[1] + ","  # line 3
    labels.write_text("\n".join(lines) + "\n")
  elif case == "out exists":
    out.write_text("keep me\n")
  elif case == "out is labels":
    out = labels
  elif case == "nan":
    features = np.load(tmp_path / "features.npy")
    features[3, 5] = np.nan
    np.save(tmp_path / "features.npy", features)
  elif case == "rank":
    np.save(tmp_path / "features.npy", np.zeros((30, 4, 4)))
  elif case == "row out of range":
    (tmp_path / "rows.csv").write_text("id,label\n0,Bag\n30,Coat\n")
  elif case == "row not an index":
    (tmp_path / "rows.csv").write_text("id,label\na.png,Bag\n")
  elif case == "foreign workdir":
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("precious")
    extra = extra + ["--workdir", tmp_path / "other"]
  elif case == "workdir holds the inputs":
    extra = extra + ["--workdir", tmp_path]
  before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
  if form == "images":
    args = ["--images", images_dir, "--labels", labels, "--epochs", 1]
  else:
    args = ["--features", tmp_path / "features.npy", "--labels", tmp_path / "rows.csv"]
  flags = {"--sampler": "CoreGCN", "--budget": 5}
  if "--force" in extra:
    args.append("--force")
    extra = [e for e in extra if e != "--force"]
  flags.update(dict(zip(extra[::2], extra[1::2])))
  for flag, value in flags.items():
    args += [flag, value]
  code = select(*args, "--out", out)
  err = capsys.readouterr().err
  assert code == 2
  assert err.startswith("jax-seqgcn select: error: ") and err.count("\n") == 1, err
  assert "Traceback" not in err
  for part in parts:
    assert part in err, err
  after = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
  assert after == before  # nothing written, nothing changed


def test_mixed_sizes_and_modes_with_image_size(tmp_path, fmnist, capsys):
  images, targets = fmnist
  directory = tmp_path / "mixed"
  ids = write_folder(directory, images, 24)
  Image.fromarray(np.repeat(images[5], 3, axis=-1)).resize((40, 30)).save(
      directory / ids[5])  # RGB and another size
  write_labels(tmp_path / "labels.csv", [(ids[i], NAMES[targets[i]]) for i in range(8)])
  args = ["--images", directory, "--labels", tmp_path / "labels.csv", "--budget", 4,
          "--sampler", "Random", "--epochs", 1, "--batch_size", 8, "--image_size", 16,
          "--workdir", tmp_path / "w", "--out", tmp_path / "p.csv"]
  assert select(*args) == 0, capsys.readouterr().err
  _, _, record = own_data.load_learner(tmp_path / "w")
  assert record["image_shape"] == [16, 16, 3]  # one RGB image: all RGB
  assert not (tmp_path / "p.workdir").exists()
  # An existing workdir is refused without --force, replaced with it.
  assert select(*args[:-2], "--out", tmp_path / "q.csv") == 2
  assert "w exists; pass --force" in capsys.readouterr().err
  assert not (tmp_path / "q.csv").exists()
  assert select(*args[:-2], "--out", tmp_path / "q.csv", "--force", "--seed", 1) == 0
  assert own_data.load_learner(tmp_path / "w")[2]["picks"] == read_picks(tmp_path / "q.csv")[1]


def test_diverged_learner_writes_nothing(tmp_path, folder_data, capsys):
  directory, ids, targets = folder_data
  write_labels(tmp_path / "labels.csv", [(ids[i], NAMES[targets[i]]) for i in range(20)])
  before = files_under(tmp_path)
  code = select("--images", directory, "--labels", tmp_path / "labels.csv", "--budget", 5,
                "--sampler", "Random", "--epochs", 2, "--batch_size", 8, "--learning_rate", 1e30,
                "--out", tmp_path / "p.csv")
  err = capsys.readouterr().err
  assert code == 1 and "diverged" in err and err.count("\n") == 1, err
  assert files_under(tmp_path) == before


def test_help_in_a_subprocess_and_the_console_script():
  out = run_python("-m", "jax_seqgcn", "select", "--help")
  assert out.returncode == 0, out.stderr
  for flag in ("--features", "--images", "--labels", "--budget", "--sampler", "--out",
               "--learner", "--epochs", "--image_size", "--workdir", "--option", "--force"):
    assert flag in out.stdout
  bad = run_python("-m", "jax_seqgcn", "select", "--budget", 3)
  assert bad.returncode == 2 and bad.stderr.startswith("jax-seqgcn select: error: ")
  # setup.cfg's console script names cli.main; run the installed one when there is one.
  setup = configparser.ConfigParser()
  setup.read(ROOT / "setup.cfg")
  script = setup["options.entry_points"]["console_scripts"].strip()
  name, target = (s.strip() for s in script.split("="))
  module, function = target.split(":")
  assert name == "jax-seqgcn" and getattr(importlib.import_module(module), function) is cli.main
  if shutil.which(name):
    installed = subprocess.run([name, "select", "--help"], capture_output=True, text=True,
                               timeout=120)
    assert installed.returncode == 0 and "--images" in installed.stdout


def test_parse_option():
  assert cli.parse_option("steps=20") == ("steps", 20)
  assert cli.parse_option("s_margin = 0.2") == ("s_margin", 0.2)
  assert cli.parse_option("adjacency=dense") == ("adjacency", "dense")
  assert cli.parse_option("flag=true") == ("flag", True)
  with pytest.raises(Exception, match="NAME=VALUE"):
    cli.parse_option("steps")


def test_picks_csv_quotes_ids_with_commas():
  text = own_data.picks_csv_text(own_data.Picks(['a,b.png', 'c"d.png'], None, None))
  assert list(csv.reader(text.splitlines())) == [["rank", "id"], ["1", "a,b.png"],
                                                 ["2", 'c"d.png']]


def test_tsne_subcommand_is_wired(tmp_path, capsys):
  assert cli.main(["tsne", "--help"]) == 0
  assert "--compare" in capsys.readouterr().out
  missing = tmp_path / "no_such_workdir"
  assert cli.main(["tsne", str(missing), "--cycles", "0", "--out", str(tmp_path / "f.png")]) == 2
  assert str(missing) in capsys.readouterr().err
  assert not (tmp_path / "f.png").exists()
