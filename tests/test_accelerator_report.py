"""experiments/accelerator_report.py: one JSON line, every measurement present, no heavy imports.

The end-to-end test runs `--small` once, in a subprocess that behaves like a bare accelerator host:
ml_collections, tensorflow(_datasets) and orbax are made unimportable (`sys.modules[name] = None`
makes `import name` raise ImportError) before the script starts, so any use of them shows up as
an "error" in the report (or a crash).
"""

import json
import os
import sys

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.conftest import python_env
from tests.conftest import run_python

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))

import accelerator_report  # noqa: E402  (a script directory, not a package)

BLOCKED = ("ml_collections", "tensorflow_datasets", "tensorflow", "orbax")

_WRAPPER = """
import runpy, sys
for name in {blocked!r}:
  sys.modules[name] = None
sys.argv = {argv!r}
runpy.run_path({script!r}, run_name="__main__")
loaded = sorted(n for n in {blocked!r} if sys.modules.get(n) is not None)
assert not loaded, loaded
"""

_NUMERIC = {
    "train": ("first_epoch_with_compile_s", "images_per_s", "ms_per_step", "last_loss"),
    "eval": ("evaluate_first_with_compile_s", "evaluate_warm_s", "evaluate_images_per_s",
             "extract_embeddings_s", "extract_embeddings_images_per_s"),
    "samplers": ("first_with_compile_s", "warm_s"),
}


def _positive(record, key):
  value = record[key]
  assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
  assert np.isfinite(value) and value > 0, (key, value)


@pytest.mark.slow  # ~95 s on a loaded 2-core CPU (~45 s of CPU time)
def test_small_report_on_cpu_without_heavy_imports(tmp_path):
  script = str(ROOT / "experiments" / "accelerator_report.py")
  out = tmp_path / "report.json"
  code = _WRAPPER.format(blocked=BLOCKED, script=script,
                         argv=[script, "--small", "--out", str(out)])
  proc = run_python("-c", code, timeout=600, cwd=str(ROOT), env=python_env(JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, proc.stdout[-2000:]  # the JSON line and nothing else on stdout
  report = json.loads(lines[0])
  assert json.loads(out.read_text()) == report

  assert set(report) == {"report", "mode", "sizes", "platform", "train", "eval", "samplers",
                         "k_center", "total_wall_s"}
  assert report["mode"] == "small" and report["sizes"] == accelerator_report.SIZES["small"]
  errors = {section: record for section in ("platform", "k_center")
            for record in [report[section]] if "error" in record}
  errors.update({f"{section}/{name}": record
                 for section in ("train", "eval", "samplers")
                 for name, record in report[section].items() if "error" in record})
  assert not errors, errors

  platform = report["platform"]
  assert platform["backend"] == "cpu" and platform["device_kinds"]
  for key in ("jax", "jaxlib", "flax", "optax", "numpy"):
    assert isinstance(platform[key], str) and platform[key], key
  assert platform["process_count"] == 1 and platform["device_count"] >= 1

  assert set(report["train"]) == set(report["eval"]) == {"float32", "bfloat16"}
  assert set(report["samplers"]) == {"UncertainGCN", "CoreGCN"}
  for section, keys in _NUMERIC.items():
    for record in report[section].values():
      for key in keys:
        _positive(record, key)
  for dtype, record in report["train"].items():
    assert record["compute_dtype"] == dtype
    assert len(record["epoch_s"]) == report["sizes"]["timed_epochs"]
  for record in report["samplers"].values():
    assert record["picks_valid"] is True

  k_center = report["k_center"]
  for key in ("first_with_compile_s", "warm_s", "numpy_float64_s"):
    _positive(k_center, key)
  assert k_center["picks_valid"] is True
  assert k_center["matches_float64"] is True and k_center["first_difference"] is None
  _positive(report, "total_wall_s")


def test_float64_reference_k_center_by_hand():
  # 1-D points; centre at 0. Farthest is 10, then the point farthest from {0, 10}: 4 (|4-0| = 4
  # beats 6's 4 by being first on the tie), then 6 (nearest centre 4 at distance 2, as 1's is 1).
  x = np.array([[0.0], [1.0], [4.0], [6.0], [10.0]])
  picks = accelerator_report.k_center_float64(x, np.array([1, 0, 0, 0, 0], bool), 3)
  assert picks.tolist() == [4, 2, 3]
