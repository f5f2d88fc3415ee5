"""`jax-seqgcn select` against hostile input (issue 21): nothing lost, nothing hangs, one line.

Each test is one case of the issue: two selects on one output, leftovers of a killed select,
`--force` on a folder holding other files, a named pipe among the inputs, an absurd batch size,
absurd sampler options, out-of-range seeds, an unclosed quote in the labels CSV, an output
folder that cannot be written, and a text file named `.npy`. Small synthetic inputs; the
learner's training is replaced by a stand-in except where the training itself is the point.
"""

import contextlib
import csv
import json
import os
import pathlib
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
from PIL import Image

from jax_seqgcn.apps import cli
from jax_seqgcn.apps import own_data
from jax_seqgcn.data import folder
from jax_seqgcn.experiment import cycle
from jax_seqgcn.experiment import workdir as workdir_lib
from tests.conftest import python_command
from tests.conftest import python_env
from tests.conftest import run_python

NUM_IMAGES, NUM_LABELLED = 30, 10
CLASSES = ("Bag", "Coat")


def select(*args) -> int:
  return cli.main(["select", *map(str, args)])


def read_picks(path):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return rows[0], [row[1] for row in rows[1:]]


def snapshot(path: pathlib.Path):
  """Every path under `path` (hidden ones too) with its bytes (None for a folder)."""
  return {p: p.read_bytes() if p.is_file() else None for p in path.rglob("*")}


def one_error_line(err: str, *parts: str) -> None:
  assert err.startswith("jax-seqgcn select: error: ") and err.count("\n") == 1, err
  assert "Traceback" not in err
  for part in parts:
    assert part in err, err


@pytest.fixture
def data(tmp_path):
  """tmp_path with images/ (NUM_IMAGES 12x12 noise PNGs, some nested), labels.csv (the first
  NUM_LABELLED), features.npy [NUM_IMAGES, 8] and rows.csv (rows 0..NUM_LABELLED-1)."""
  rng = np.random.default_rng(0)
  ids = [f"part{i % 2}/img{i:02d}.png" if i % 3 else f"img{i:02d}.png" for i in range(NUM_IMAGES)]
  for id_ in ids:
    path = tmp_path / "images" / id_
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(path)
  labels = [(ids[i], CLASSES[i % 2]) for i in range(NUM_LABELLED)]
  with open(tmp_path / "labels.csv", "w", newline="") as f:
    csv.writer(f).writerows([("id", "label")] + labels)
  np.save(tmp_path / "features.npy", rng.random((NUM_IMAGES, 8)).astype(np.float32))
  with open(tmp_path / "rows.csv", "w", newline="") as f:
    csv.writer(f).writerows([("id", "label")] + [(i, CLASSES[i % 2])
                                                 for i in range(NUM_LABELLED)])
  return tmp_path, ids


def features_args(tmp_path, *extra):
  return ["--features", tmp_path / "features.npy", "--labels", tmp_path / "rows.csv",
          "--budget", 3, *extra]


def images_args(tmp_path, *extra):
  return ["--images", tmp_path / "images", "--labels", tmp_path / "labels.csv", "--budget", 3,
          "--epochs", 1, *extra]


def fake_training(monkeypatch, during=None, calls=None):
  """Replaces the learner's training, embedding and sampling of `select --images` by a stand-in
  that writes a checkpoint-like folder, calls `during(staging)` and picks the first unlabelled
  images; `calls` (a list) gets the config of each call."""

  def train_and_sample(config, staging, dataset, labelled, unlabelled, ids, stream):
    (staging / "checkpoints" / "0").mkdir(parents=True)
    (staging / "checkpoints" / "0" / "state").write_text("learner")
    if calls is not None:
      calls.append(config)
    if during is not None:
      during(staging)
    picks = [ids[i] for i in unlabelled[:config.al.budget]]
    return own_data.Picks(picks, None, None), dict(train=0.0, embed=0.0, sample=0.0)

  monkeypatch.setattr(own_data, "_train_and_sample", train_and_sample)


def no_sampling(monkeypatch):
  """Makes any sampler call (features form) or training (images form) fail the test."""
  monkeypatch.setattr(own_data, "sample", lambda *a, **k: pytest.fail("sampling started"))
  monkeypatch.setattr(cycle, "train_learner", lambda *a, **k: pytest.fail("training started"))


def dead_pid() -> int:
  """The pid of a process that has ended."""
  process = subprocess.Popen(["true"])
  process.wait()
  return process.pid


# Case 1: two selects on one output: exactly one wins, the other says so in one line.


def test_second_select_on_the_same_out_is_refused_features(data, monkeypatch, capsys):
  tmp_path, _ = data
  out = tmp_path / "picks.csv"
  nested = {}
  sample = own_data.sample

  def sample_while_another_starts(*args, **kwargs):
    if not nested:  # a second select starts while the first one samples
      nested["code"] = select(*features_args(tmp_path, "--sampler", "UncertainGCN", "--option",
                                             "steps=5", "--out", out))
      nested["err"] = capsys.readouterr().err
    return sample(*args, **kwargs)

  monkeypatch.setattr(own_data, "sample", sample_while_another_starts)
  assert select(*features_args(tmp_path, "--sampler", "Random", "--out", out)) == 0
  captured = capsys.readouterr()
  assert nested["code"] == 2
  one_error_line(nested["err"], str(out), "another jax-seqgcn select", f"(pid {os.getpid()})",
                 "--out")
  assert captured.out.count("wrote") == 1
  assert read_picks(out)[0] == ["rank", "id"]  # Random's; UncertainGCN's has a score column
  assert not list(tmp_path.glob(".picks.csv*"))  # the lock is gone


def test_second_select_on_the_same_out_or_workdir_is_refused_images(data, monkeypatch, capsys):
  tmp_path, _ = data
  out = tmp_path / "picks.csv"
  results = []

  def during(staging):
    # Same --out (and default workdir); then another --out but the same --workdir.
    for extra in (["--out", out], ["--out", tmp_path / "other.csv",
                                   "--workdir", tmp_path / "picks.workdir"]):
      results.append((select(*images_args(tmp_path, "--sampler", "Random", *extra)),
                      capsys.readouterr().err))

  fake_training(monkeypatch, during)
  assert select(*images_args(tmp_path, "--sampler", "Entropy", "--out", out)) == 0
  assert capsys.readouterr().out.count("wrote") == 1
  (code1, err1), (code2, err2) = results
  assert code1 == 2 and code2 == 2
  one_error_line(err1, str(out), "another jax-seqgcn select", "--out")
  one_error_line(err2, str(tmp_path / "picks.workdir"), "another jax-seqgcn select",
                 "--workdir")
  assert not (tmp_path / "other.csv").exists()
  record = json.loads((tmp_path / "picks.workdir" / "select.json").read_text())
  assert record["picks"] == read_picks(out)[1]
  assert workdir_lib.read_config(tmp_path / "picks.workdir")["sampler"]["name"] == "Entropy"
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_held_output_stops_a_select_in_another_process(data):
  tmp_path, _ = data
  out = tmp_path / "picks.csv"
  with own_data.output_lock(out, "--out"):
    before = snapshot(tmp_path)
    result = run_python("-m", "jax_seqgcn", "select",
                        *features_args(tmp_path, "--sampler", "Random", "--out", out),
                        cwd=tmp_path)
    assert snapshot(tmp_path) == before
  assert result.returncode == 2, result.stderr
  one_error_line(result.stderr, str(out), "another jax-seqgcn select", f"(pid {os.getpid()})")
  assert "sampling" not in result.stdout
  assert not list(tmp_path.glob(".picks.csv*"))


# Case 2: leftovers of a killed select are removed by the next one; nothing else is.


def test_leftovers_of_killed_selects_are_removed(data, monkeypatch, capsys):
  tmp_path, _ = data
  dead, alive = dead_pid(), os.getppid()
  stale = [f".picks.workdir.tmp-{dead}", f".picks.workdir.old-{dead}"]
  kept = [f".picks.workdir.tmp-{alive}", f".other.workdir.tmp-{dead}", f"picks.workdir.tmp-{dead}",
          f".picks.workdir.tmp-{dead}x", f".picks.workdir.tmp-{dead}.keep"]
  for name in stale + kept:
    (tmp_path / name / "checkpoints").mkdir(parents=True)
    (tmp_path / name / "checkpoints" / "state").write_text("old")
  (tmp_path / f".picks.csv.tmp-{dead}").write_text("rank,id\n")
  (tmp_path / f".picks.csv.tmp-{alive}").write_text("rank,id\n")
  fake_training(monkeypatch)
  assert select(*images_args(tmp_path, "--sampler", "Random", "--out",
                             tmp_path / "picks.csv")) == 0
  out = capsys.readouterr().out
  for name in stale + [f".picks.csv.tmp-{dead}"]:
    assert not (tmp_path / name).exists(), name
    assert f"removed {tmp_path / name}, left by an interrupted select (pid {dead})" in out
  for name in kept + [f".picks.csv.tmp-{alive}"]:
    assert (tmp_path / name).exists(), name


SIGTERM_SCRIPT = """
import pathlib, sys, time
from jax_seqgcn.apps import cli, own_data
MARKER = pathlib.Path(sys.argv[1])

def train_and_sample(config, staging, *args):
  (staging / "checkpoints").mkdir(parents=True)
  (staging / "checkpoints" / "state").write_text("half")
  MARKER.write_text("training")
  time.sleep(120)
  raise AssertionError("not stopped by SIGTERM")

own_data._train_and_sample = train_and_sample
sys.argv = ["jax-seqgcn"] + sys.argv[2:]
sys.exit(cli.main())
"""


def test_sigterm_leaves_no_temporary_folder_or_lock(data):
  tmp_path, _ = data
  marker = tmp_path / "training.marker"
  work = tmp_path / "work"
  work.mkdir()
  args = ["select", *images_args(tmp_path, "--sampler", "Random", "--out", work / "p.csv")]
  process = subprocess.Popen(python_command("-c", SIGTERM_SCRIPT, marker, *args),
                             env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path)
  try:
    deadline = time.monotonic() + 240
    while not marker.exists():
      assert process.poll() is None, process.communicate()
      assert time.monotonic() < deadline, "the select never reached its training"
      time.sleep(0.2)
    assert [p.name for p in work.iterdir()] != []  # the staging folder and locks exist now
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  assert process.returncode == 128 + signal.SIGTERM, err
  assert list(work.iterdir()) == []  # no .p.workdir.tmp-PID, no lock, no output


# Case 3: --force replaces only what select wrote.


def test_force_never_deletes_a_file_select_did_not_write(data, monkeypatch, capsys):
  tmp_path, _ = data
  fake_training(monkeypatch)
  args = images_args(tmp_path, "--sampler", "Random", "--workdir", tmp_path / "w")
  assert select(*args, "--out", tmp_path / "a.csv") == 0
  manifest = json.loads((tmp_path / "w" / own_data.MANIFEST).read_text())["entries"]
  assert manifest == sorted(["checkpoints/", "checkpoints/0/", "checkpoints/0/state",
                             "config.json", "picks.csv", "select.json", own_data.MANIFEST])
  # Untouched, --force replaces it.
  assert select(*args, "--out", tmp_path / "b.csv", "--force", "--seed", 1) == 0
  capsys.readouterr()
  # A file planted inside (at any depth) keeps the workdir, even with --force.
  for planted in ("thesis.tex", "checkpoints/0/thesis.tex"):
    (tmp_path / "w" / planted).write_text("precious")
    before = snapshot(tmp_path)
    assert select(*args, "--out", tmp_path / "c.csv", "--force") == 2
    one_error_line(capsys.readouterr().err, f"w holds {planted}, which jax-seqgcn select did "
                                            "not write", "even with --force")
    assert snapshot(tmp_path) == before
    (tmp_path / "w" / planted).unlink()
  # A link planted inside (select writes none) keeps it too.
  (tmp_path / "w" / "data").symlink_to(tmp_path / "images")
  assert select(*args, "--out", tmp_path / "c.csv", "--force") == 2
  one_error_line(capsys.readouterr().err, "w holds data, which jax-seqgcn select did not write")
  assert (tmp_path / "images" / "img00.png").exists()


def test_force_never_deletes_a_folder_that_merely_holds_select_json(data, monkeypatch, capsys):
  tmp_path, _ = data
  fake_training(monkeypatch)
  thesis = tmp_path / "thesis"
  thesis.mkdir()
  (thesis / "select.json").write_text("{}")
  (thesis / "thesis.tex").write_text("precious")
  before = snapshot(tmp_path)
  assert select(*images_args(tmp_path, "--sampler", "Random", "--workdir", thesis, "--out",
                             tmp_path / "p.csv", "--force")) == 2
  one_error_line(capsys.readouterr().err, "thesis exists and is not a workdir of jax-seqgcn "
                                          "select", own_data.MANIFEST, "even with --force")
  assert snapshot(tmp_path) == before


# Case 4: a named pipe (or a device) among the inputs is refused, never opened.


@contextlib.contextmanager
def unblocking(fifo: pathlib.Path, after: float = 20.0):
  """Were `fifo` opened for reading, a writer opens and closes it after `after` s, so the
  reader sees end of file rather than waiting forever (the test then fails, not hangs)."""
  stop = threading.Event()

  def run():
    if stop.wait(after):
      return
    while not stop.is_set():
      try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
      except OSError:  # no reader now
        pass
      stop.wait(0.1)

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()


@pytest.mark.parametrize("where", ["image folder", "labels", "features"])
def test_a_named_pipe_is_refused_not_read(data, monkeypatch, capsys, where):
  tmp_path, _ = data
  no_sampling(monkeypatch)
  if where == "image folder":
    fifo = tmp_path / "images" / "part1" / "pipe.png"
    args = images_args(tmp_path, "--sampler", "Random")
    parts = ["pipe.png: a named pipe, not a regular file", "move it out"]
  elif where == "labels":
    fifo = tmp_path / "pipe.csv"
    args = images_args(tmp_path, "--sampler", "Random")
    args[args.index("--labels") + 1] = fifo
    parts = ["pipe.csv: a named pipe, not a regular file", "labels CSV"]
  else:
    fifo = tmp_path / "pipe.npy"
    args = features_args(tmp_path, "--sampler", "Random")
    args[1] = fifo
    parts = ["pipe.npy: a named pipe, not a regular file", "features file"]
  os.mkfifo(fifo)
  before = snapshot(tmp_path)
  start = time.monotonic()
  with unblocking(fifo):
    code = select(*args, "--out", tmp_path / "p.csv")
  assert time.monotonic() - start < 20
  assert code == 2
  one_error_line(capsys.readouterr().err, *parts)
  assert snapshot(tmp_path) == before


def test_open_regular_refuses_devices_and_folders(tmp_path):
  with pytest.raises(folder.InputError, match="a character device, not a regular file"):
    folder.open_regular("/dev/null", what="labels CSV")
  with pytest.raises(folder.InputError, match="a folder, not a regular file"):
    folder.open_regular(tmp_path, what="labels CSV")
  (tmp_path / "link.png").symlink_to(tmp_path / "missing.png")
  with pytest.raises(folder.InputError, match="link.png: a broken symbolic link"):
    folder.list_images(tmp_path)


# Case 5: a batch larger than the labelled set is lowered to it.


def test_huge_batch_size_is_capped_at_the_labelled_count(data, monkeypatch, capsys):
  tmp_path, _ = data
  calls = []
  fake_training(monkeypatch, calls=calls)
  assert select(*images_args(tmp_path, "--sampler", "Random", "--batch_size", 1000000,
                             "--out", tmp_path / "p.csv")) == 0
  out = capsys.readouterr().out
  assert out.count("batch size 1000000 is larger than the 10 labelled images: training with "
                   "batch size 10") == 1, out
  assert calls[0].train.batch_size == NUM_LABELLED
  assert workdir_lib.read_config(tmp_path / "p.workdir")["train"]["batch_size"] == NUM_LABELLED
  # A batch that fits is kept as given, without a word.
  assert select(*images_args(tmp_path, "--sampler", "Random", "--batch_size", 4,
                             "--out", tmp_path / "q.csv")) == 0
  assert "batch size" not in capsys.readouterr().out and calls[1].train.batch_size == 4


def test_huge_batch_size_trains(data, capsys):
  """The real training with --batch_size 10**6 (an out-of-memory error before), then --force
  over the workdir it wrote (its manifest lists the learner's checkpoint files)."""
  tmp_path, _ = data
  args = images_args(tmp_path, "--sampler", "Random", "--batch_size", 1000000)
  assert select(*args, "--out", tmp_path / "p.csv") == 0, capsys.readouterr().err
  assert "training with batch size 10" in capsys.readouterr().out
  record = own_data.load_learner(tmp_path / "p.workdir")[2]
  assert record["picks"] == read_picks(tmp_path / "p.csv")[1]
  assert select(*args, "--out", tmp_path / "p.csv", "--force", "--seed", 1) == 0, (
      capsys.readouterr().err)
  assert own_data.load_learner(tmp_path / "p.workdir")[2]["picks"] == read_picks(
      tmp_path / "p.csv")[1]


# Case 6: absurd sampler options are refused before any work.


# The bounds are the registry's own (`Sampler.check`): the same words as the library's.
@pytest.mark.parametrize("form, sampler, option, bound", [
    ("features", "CoreGCN", "steps=1000000000", "steps must be <= 1000000"),
    ("features", "UncertainGCN", "hidden=10000000", "hidden must be <= 65536"),
    ("features", "UncertainDiscriminator", "steps=1000001", "steps must be <= 1000000"),
    ("images", "VAAL", "vaal_epochs=1e9", "vaal_epochs must be <= 10000"),
    ("images", "VAAL", "vaal_width=100.0", "vaal_width must be <= 8"),
])
def test_absurd_sampler_options_are_refused(data, monkeypatch, capsys, form, sampler, option,
                                            bound):
  tmp_path, _ = data
  no_sampling(monkeypatch)
  make_args = features_args if form == "features" else images_args
  before = snapshot(tmp_path)
  assert select(*make_args(tmp_path, "--sampler", sampler, "--option", option,
                           "--out", tmp_path / "p.csv")) == 2
  one_error_line(capsys.readouterr().err, f"sampler {sampler}: ", bound)
  assert snapshot(tmp_path) == before


def test_bounded_options_at_their_bound_pass():
  _, options = own_data.resolve_sampler("CoreGCN", {"hidden": 65536, "steps": 10 ** 6})
  assert options["hidden"] == 65536 and options["steps"] == 10 ** 6


# Case 7: a seed outside [0, 2**32) is refused up front.


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", str(2 ** 32), str(2 ** 64 - 1)])
def test_out_of_range_seed_is_refused(data, monkeypatch, capsys, seed):
  tmp_path, _ = data
  no_sampling(monkeypatch)
  for make_args in (features_args, images_args):
    before = snapshot(tmp_path)
    assert select(*make_args(tmp_path, "--sampler", "Random", "--seed", seed,
                             "--out", tmp_path / "p.csv")) == 2
    one_error_line(capsys.readouterr().err, "seed must be an integer in [0, 4294967295]", seed)
    assert snapshot(tmp_path) == before


def test_seed_bounds_pass(data, capsys):
  tmp_path, _ = data
  for seed in (0, 2 ** 32 - 1):
    assert select(*features_args(tmp_path, "--sampler", "Random", "--seed", seed,
                                 "--out", tmp_path / f"p{seed}.csv")) == 0
  assert read_picks(tmp_path / "p0.csv") != read_picks(tmp_path / f"p{2 ** 32 - 1}.csv")


# Case 8: a row the csv module merged over lines (an unclosed quote) is refused.


@pytest.mark.parametrize("text, line", [
    ('id,label\n0,Bag\n1,"Coat\n2,Dress\n3,Bag\n', 3),  # unclosed: swallows the rest
    ('id,label\n0,Bag\n\n1,"Co\nat"\n2,Dress\n', 4),  # closed, but a line break in a label
    ('id,label\r\n0,"Bag\r\n1",Coat\r\n', 2),
])
def test_a_row_over_several_lines_is_refused(data, monkeypatch, capsys, text, line):
  tmp_path, _ = data
  no_sampling(monkeypatch)
  (tmp_path / "rows.csv").write_bytes(text.encode())
  before = snapshot(tmp_path)
  assert select(*features_args(tmp_path, "--sampler", "Random", "--out",
                               tmp_path / "p.csv")) == 2
  one_error_line(capsys.readouterr().err, f"rows.csv line {line}: a quoted field runs over lines",
                 "unclosed quote")
  assert snapshot(tmp_path) == before


def test_quoted_fields_on_one_line_still_read(tmp_path):
  (tmp_path / "l.csv").write_text('id,label\n"a,b.png","T-shirt/top"\n\nc.png,"say ""hi"""\n')
  labels = folder.read_labels(tmp_path / "l.csv")
  assert labels.ids == ["a,b.png", "c.png"] and labels.labels == ["T-shirt/top", 'say "hi"']
  assert labels.lines == [2, 4]


# Case 9: an output folder that cannot be written is found before any work.

READ_ONLY_SCRIPT = """
import json, sys
from jax_seqgcn.apps import cli
codes = [cli.main(["select"] + args) for args in json.loads(sys.argv[1])]
print("CODES", json.dumps(codes))
"""


def test_output_folder_that_cannot_be_written_is_refused_first(data, monkeypatch, capsys):
  tmp_path, _ = data
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  runs = [
      features_args(tmp_path, "--sampler", "Random", "--out", read_only / "p.csv"),
      features_args(tmp_path, "--sampler", "Random", "--out", read_only / "new" / "p.csv"),
      images_args(tmp_path, "--sampler", "Random", "--out", tmp_path / "p.csv",
                  "--workdir", read_only / "w"),
  ]
  runs = [[str(a) for a in args] for args in runs]
  before = snapshot(tmp_path)
  read_only.chmod(0o555)
  try:
    if os.geteuid() != 0:
      no_sampling(monkeypatch)
      codes = [cli.main(["select", *args]) for args in runs]
      captured = capsys.readouterr()
      out, err = captured.out, captured.err
    else:  # root writes anywhere: run without the capability that lets it
      setpriv = shutil.which("setpriv")
      if setpriv is None:
        pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
      caps = "-dac_override,-dac_read_search,-fowner"
      result = subprocess.run(
          [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}",
           *python_command("-c", READ_ONLY_SCRIPT, json.dumps(runs))],
          capture_output=True, text=True, timeout=300, env=python_env(), cwd=tmp_path)
      assert "CODES" in result.stdout, result.stderr
      out, err = result.stdout, result.stderr
      codes = json.loads(out.split("CODES", 1)[1])
  finally:
    read_only.chmod(0o755)
  assert codes == [2, 2, 2], (out, err)
  assert "sampling" not in out and "reading" not in out and "training" not in out
  lines = err.splitlines()
  assert len(lines) == 3, err
  for line, missing in zip(lines, [read_only, read_only / "new", read_only]):
    one_error_line(line + "\n", str(missing))
    assert "cannot write there" in line or "cannot create the folder" in line, line
  assert snapshot(tmp_path) == before


# Case 10: a text file named .npy is described as what it is.


def test_text_file_named_npy_is_not_called_pickled(data, monkeypatch, capsys):
  tmp_path, _ = data
  no_sampling(monkeypatch)
  (tmp_path / "features.npy").write_text("0.1,0.2\n0.3,0.4\n")
  assert select(*features_args(tmp_path, "--sampler", "Random", "--out",
                               tmp_path / "p.csv")) == 2
  err = capsys.readouterr().err
  one_error_line(err, "features.npy: not a NumPy .npy or .npz file (it starts with b'0.1,0.2")
  assert "pickle" not in err
  (tmp_path / "features.npy").write_bytes(b"")
  assert select(*features_args(tmp_path, "--sampler", "Random", "--out",
                               tmp_path / "p.csv")) == 2
  one_error_line(capsys.readouterr().err, "not a NumPy .npy or .npz file (an empty file)")
  np.save(tmp_path / "features.npy", np.array([{"a": 1}, None], dtype=object))
  assert select(*features_args(tmp_path, "--sampler", "Random", "--out",
                               tmp_path / "p.csv")) == 2
  one_error_line(capsys.readouterr().err, "an array of Python objects", "never loaded")


def test_multi_line_errors_are_one_line():
  assert cli.one_line("bad config:\n  - train.epochs bad\n  - al.budget bad") == (
      "bad config: train.epochs bad; al.budget bad")


def test_a_diverging_gcn_is_one_line_and_writes_nothing(data, capsys):
  tmp_path, _ = data
  out = tmp_path / "picks.csv"
  code = select(*features_args(tmp_path, "--sampler", "UncertainGCN", "--option",
                               "learning_rate=1e30", "--option", "steps=5", "--out", out))
  assert code == cli.RUN_ERROR
  one_error_line(capsys.readouterr().err, "diverged")
  assert not out.exists()
