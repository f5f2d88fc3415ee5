"""The package's floors hold: each module imports only from its own floor or the ones below.

apps -> experiment -> samplers -> training, selection -> models, data, runtime, checks.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jax_seqgcn"

# Floor of each part of the package (higher imports lower, never the reverse).
FLOORS = {
    "checks": 0, "models": 0, "data": 0, "runtime": 0,
    "training": 1, "selection": 1,
    "samplers": 2,
    "experiment": 3,
    "apps": 4,
}


def _part(module: str) -> str:
  """'jax_seqgcn.training.fit' -> 'training'."""
  return module.split(".")[1]


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    name = ".".join(relative.parts)
    if relative.parts[1] in ("__init__", "__main__"):
      continue  # the top-level re-exports and `python -m` sit above every floor
    yield name, path


def _imports(path: pathlib.Path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jax_seqgcn"):
      if node.module == "jax_seqgcn":
        yield from (f"jax_seqgcn.{alias.name}" for alias in node.names)
      else:
        yield node.module
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("jax_seqgcn."))


def test_every_part_has_a_floor():
  parts = {_part(name) for name, _ in _modules()}
  assert parts <= set(FLOORS), sorted(parts - set(FLOORS))


@pytest.mark.parametrize("name, path", list(_modules()), ids=lambda x: str(x))
def test_no_module_imports_upwards(name, path):
  floor = FLOORS[_part(name)]
  upward = [m for m in _imports(path) if FLOORS[_part(m)] > floor]
  assert not upward, f"{name} (floor {floor}) imports {upward}"


def test_same_floor_parts_do_not_import_each_other():
  # training and selection share a floor, as do models, data, runtime and checks (checks may
  # be used by any of them: it is the floor's own helpers).
  crossing = []
  for name, path in _modules():
    for imported in _imports(path):
      a, b = _part(name), _part(imported)
      if a != b and FLOORS[a] == FLOORS[b] and b != "checks":
        crossing.append((name, imported))
  assert not crossing


def test_no_module_is_huge():
  sizes = {name: len(path.read_text().splitlines()) for name, path in _modules()}
  assert max(sizes.values()) <= 520, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
  training = {n: s for n, s in sizes.items() if _part(n) == "training"}
  assert max(training.values()) <= 400, training


def test_import_loads_no_checkpointing_or_config_library():
  code = ("import sys, jax_seqgcn; "
          "print(sorted(m for m in ('orbax', 'orbax.checkpoint', 'ml_collections', "
          "'jax_seqgcn.experiment.loop', 'jax_seqgcn.apps.cli') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=PACKAGE.parent, timeout=120)
  assert out.stdout.strip() == "[]"


def test_lazy_names_resolve_to_the_layer_that_defines_them():
  import jax_seqgcn  # pylint: disable=import-outside-toplevel
  from jax_seqgcn.experiment import cycle, loop  # pylint: disable=import-outside-toplevel
  assert jax_seqgcn.run is loop.run
  assert jax_seqgcn.run_cycle is cycle.run_cycle
  assert "run" in dir(jax_seqgcn)
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    jax_seqgcn.nope  # pylint: disable=pointless-statement
