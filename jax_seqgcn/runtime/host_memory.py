"""Transparent huge pages for XLA:CPU's per-run buffers (Linux with glibc >= 2.35).

XLA:CPU allocates the temporary buffers of each executable run afresh, as one block (2.86 GB
for a ResNet-18 training epoch at batch 128), and glibc hands a block that large back to the
kernel when it is freed. Every epoch therefore faults its buffers in again, 4 KiB at a time:
measured here, 715,000 minor faults and 1.7 s of kernel time per ResNet-18 epoch. With
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` glibc asks for transparent huge pages on such blocks
(`madvise(MADV_HUGEPAGE)`), which cuts that to 1,400 faults and 0.3 s: ResNet-18 trains 15%
faster on a 2-step epoch (28.7 -> 33.0 images/s). PyTorch's large tensors take the same path
through glibc and gain as much, so the setting does not change our ratio against it.

glibc reads its tunables only when a process starts, so the command-line entry points
(experiments/main.py, `jax-seqgcn`) call `reexec_with_hugepages` first: when the kernel's
huge pages are in "madvise" mode, glibc is recent enough, the run is a CPU run and the variable
is not set yet, the process replaces itself (`os.execve`, same PID, arguments and environment
plus the tunable) once. `JAX_SEQGCN_HUGEPAGES=0` keeps the process as started; a
`glibc.malloc.hugetlb` entry the user put in `GLIBC_TUNABLES` is left as it is. Library users
who want the gain set the variable themselves before starting Python.

Only CPU runs restart. The buffers in question are XLA:CPU's; a GPU or TPU job keeps its
process (its host allocations are not the bottleneck, and its accelerator runtime should not
start twice). The decision is made before JAX starts its backend (`cpu_run`): from
`JAX_PLATFORMS` when set (its first entry is the default backend), else from whether a GPU/TPU
plugin is installed and its device is present (`accelerator_present`: plugin discovery and
`/dev` nodes, without importing the plugin). Initialising the backend first would cost its
start-up twice and, in multi-process runs, come before `jax.distributed.initialize`.

The tunable is for this process only. Before the exec the original `GLIBC_TUNABLES` (or its
absence) is recorded in `JAX_SEQGCN_HUGEPAGES_RESTORE`; the restarted process, in its own
`reexec_with_hugepages` call, puts the variable back as it was and drops the record, so the
subprocesses it spawns (PyTorch benchmarks, data tools, workers) do not inherit a malloc
setting they did not ask for. glibc has read the tunable by then, so this process keeps it.
"""

import glob as glob_lib
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys
from typing import Callable, Iterable, List, Mapping, MutableMapping, Optional, Tuple

TUNABLE = "glibc.malloc.hugetlb"
ENV_VAR = "GLIBC_TUNABLES"
OPT_OUT_VAR = "JAX_SEQGCN_HUGEPAGES"  # "0" (or "false", "no", "off") turns the re-exec off
# Set only across the exec: "<pid>" (GLIBC_TUNABLES was unset) or "<pid>:<original value>".
RESTORE_VAR = "JAX_SEQGCN_HUGEPAGES_RESTORE"
PLATFORMS_VAR = "JAX_PLATFORMS"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb
THP_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_PATH) -> Optional[str]:
  """The kernel's transparent huge page mode: "always", "madvise", "never", or None if unknown.

  The file reads like "always [madvise] never"; the bracketed word is the mode in force.
  """
  try:
    with open(path, encoding="ascii") as f:
      text = f.read()
  except OSError:
    return None
  for word in text.split():
    if word.startswith("[") and word.endswith("]"):
      return word[1:-1]
  return None


def glibc_version() -> Optional[Tuple[int, int]]:
  """(major, minor) of the running glibc, or None when the C library is not glibc."""
  try:
    text = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
  except (AttributeError, ValueError, OSError):
    return None
  if not text or not text.startswith("glibc "):
    return None
  try:
    major, minor = text.split()[1].split(".")[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def with_hugetlb(tunables: Optional[str]) -> str:
  """`tunables` (a GLIBC_TUNABLES value, colon-separated `name=value`) plus hugetlb=1."""
  entries = [entry for entry in (tunables or "").split(":") if entry]
  return ":".join(entries + [f"{TUNABLE}=1"])


def jax_plugins() -> List[str]:
  """Names of the installed JAX PJRT plugins (GPU, TPU, ...), found without importing them.

  As JAX discovers them: modules of the `jax_plugins` namespace package and `jax_plugins`
  entry points (e.g. "xla_cuda12", "cuda"), plus "libtpu" when the libtpu package is there.
  """
  names = []
  try:
    spec = importlib.util.find_spec("jax_plugins")
  except (ImportError, ValueError):
    spec = None
  if spec is not None and spec.submodule_search_locations:
    names += [module.name for module in pkgutil.iter_modules(spec.submodule_search_locations)]
  try:
    names += [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
  except Exception:  # pylint: disable=broad-except  # broken metadata: nothing found there
    pass
  try:
    if importlib.util.find_spec("libtpu") is not None:
      names.append("libtpu")
  except (ImportError, ValueError):
    pass
  return names


def accelerator_present(environ: Mapping[str, str], *, plugins: Optional[Iterable[str]] = None,
                        exists: Callable[[str], bool] = os.path.exists,
                        glob: Callable[[str], List[str]] = glob_lib.glob) -> bool:
  """Whether JAX would find a GPU or TPU here, judged without starting any JAX backend.

  Args:
    environ: the process environment (`CUDA_VISIBLE_DEVICES` "" or "-1" hides NVIDIA GPUs).
    plugins: installed plugin names; None = `jax_plugins()`.
    exists, glob: file system probes (tests pass fakes).
  Returns:
    True when an installed plugin's devices are there: a CUDA plugin and /dev/nvidia* nodes, a
    ROCm plugin and /dev/kfd, a TPU plugin (or libtpu) and /dev/accel* or /dev/vfio/<n>; an
    installed plugin of any other kind counts as present (the restart is only an optimisation,
    so an unknown case keeps the process as it is).
  """
  for name in jax_plugins() if plugins is None else plugins:
    name = name.lower()
    if "cuda" in name:
      if environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        continue
      if exists("/dev/nvidiactl") or glob("/dev/nvidia[0-9]*"):
        return True
    elif "rocm" in name:
      if exists("/dev/kfd"):
        return True
    elif "tpu" in name:
      if glob("/dev/accel*") or glob("/dev/vfio/[0-9]*"):
        return True
    else:
      return True
  return False


def cpu_run(environ: Mapping[str, str], *, accelerator: bool) -> bool:
  """Whether a JAX program started with `environ` runs on the CPU backend.

  Args:
    environ: the process environment. A set `JAX_PLATFORMS` decides: JAX's default backend is
      its first entry ("cpu" -> True; "cuda", "gpu", "tpu,cpu", ... -> False).
    accelerator: otherwise, whether a GPU/TPU is present (`accelerator_present`).
  """
  requested = [name.strip().lower() for name in environ.get(PLATFORMS_VAR, "").split(",")
               if name.strip()]
  if requested:
    return requested[0] == "cpu"
  return not accelerator


def should_reexec(environ: Mapping[str, str], *, mode: Optional[str],
                  glibc: Optional[Tuple[int, int]], system: str,
                  accelerator: bool = False) -> bool:
  """Whether a process with `environ` gains from restarting with the tunable.

  Args:
    environ: the process environment.
    mode: `thp_mode()`; only "madvise" needs the tunable ("always" already gives huge pages,
      "never" gives none).
    glibc: `glibc_version()`.
    system: `platform.system()`.
    accelerator: `accelerator_present(environ)`; only CPU runs restart (`cpu_run`).
  """
  if environ.get(OPT_OUT_VAR, "").strip().lower() in ("0", "false", "no", "off"):
    return False
  if system != "Linux" or mode != "madvise" or glibc is None or glibc < MIN_GLIBC:
    return False
  if not cpu_run(environ, accelerator=accelerator):
    return False
  names = [entry.split("=", 1)[0] for entry in environ.get(ENV_VAR, "").split(":")]
  return TUNABLE not in names  # set already (by us before the exec, or by the user)


def restore_environment(environ: MutableMapping[str, str], pid: int) -> bool:
  """After the restart: puts `GLIBC_TUNABLES` back as it was before the exec.

  Args:
    environ: the environment to fix (`os.environ`).
    pid: this process's id (the exec keeps it).
  Returns:
    True if `environ` held the record of an exec of this very process (now restored); False
    otherwise. A record another process left (inherited from a parent) is dropped unused.
  """
  record = environ.pop(RESTORE_VAR, None)
  if record is None:
    return False
  recorded_pid, had_value, original = record.partition(":")
  if recorded_pid != str(pid):
    return False
  if had_value:
    environ[ENV_VAR] = original
  else:
    environ.pop(ENV_VAR, None)
  return True


def process_tunables() -> Optional[str]:
  """`GLIBC_TUNABLES` as this process was started with it (what glibc read), or None if unset.

  After `reexec_with_hugepages` restarted the process, `os.environ` holds the original value
  again; this is the value the restart gave it. Otherwise `os.environ`'s value. (Linux's
  /proc/self/environ is no help: glibc rewrites the variable there while parsing it.)
  """
  return _RESTARTED_WITH[0] if _RESTARTED_WITH else os.environ.get(ENV_VAR)


def environ_with_process_tunables() -> dict:
  """A copy of `os.environ` with `GLIBC_TUNABLES` as this process runs with it.

  For a child that asks to allocate as this process does, e.g. a benchmark's PyTorch process
  (huge pages speed PyTorch up as much as us, so both sides of a ratio should have them).
  Other children get `os.environ`, without the restart's tunable.
  """
  environ = dict(os.environ)
  tunables = process_tunables()
  if tunables is None:
    environ.pop(ENV_VAR, None)
  else:
    environ[ENV_VAR] = tunables
  return environ


_CALLED = False  # reexec_with_hugepages decides once per process
_RESTARTED_WITH: List[Optional[str]] = []  # after a restart: [the GLIBC_TUNABLES it was given]


def reexec_with_hugepages() -> None:
  """Restarts this CPU run with `GLIBC_TUNABLES` asking for huge pages, if it gains from it.

  Returns without doing anything when `should_reexec` says no (GPU/TPU runs among others);
  otherwise does not return. In the restarted process it returns after restoring the
  environment (`restore_environment`), so children do not inherit the tunable. Only the first
  call in a process does anything. Call it in a program before its work starts (before JAX
  initialises a backend), never from library code. The restart runs the same command line (the
  interpreter and `sys.orig_argv[1:]`, which keeps `-m module` and interpreter options) and is
  silent (the second process prints what the first would have), so output and exit codes do
  not change.
  """
  global _CALLED
  if _CALLED:
    return
  _CALLED = True
  given = os.environ.get(ENV_VAR)
  if restore_environment(os.environ, os.getpid()):
    _RESTARTED_WITH.append(given)
    return
  decide = lambda accelerator: should_reexec(os.environ, mode=thp_mode(), glibc=glibc_version(),
                                             system=platform.system(), accelerator=accelerator)
  # The plugin scan only when everything else says yes.
  if not decide(False) or not decide(accelerator_present(os.environ)):
    return
  argv = [sys.executable] + list(getattr(sys, "orig_argv", [sys.executable] + sys.argv)[1:])
  environ = dict(os.environ)
  original = environ.get(ENV_VAR)
  environ[RESTORE_VAR] = str(os.getpid()) + ("" if original is None else ":" + original)
  environ[ENV_VAR] = with_hugetlb(original)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(argv[0], list(argv), environ)
