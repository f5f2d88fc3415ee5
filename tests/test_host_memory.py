"""Tests of jax_seqgcn.runtime.host_memory: when to restart with huge pages, the restart, the gain."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from jax_seqgcn.runtime import host_memory

QUALIFIES = host_memory.should_reexec({}, mode=host_memory.thp_mode(),
                                      glibc=host_memory.glibc_version(),
                                      system=platform.system())
needs_madvise_thp = pytest.mark.skipif(
    not QUALIFIES, reason="needs Linux, glibc >= 2.35 and transparent huge pages in madvise mode")


def _env(**changes):
  env = {k: v for k, v in os.environ.items()
         if k not in (host_memory.ENV_VAR, host_memory.OPT_OUT_VAR)}
  env.update({k: v for k, v in changes.items() if v is not None})
  return env


@pytest.mark.parametrize("text,mode", [("always [madvise] never\n", "madvise"),
                                       ("[always] madvise never\n", "always"),
                                       ("always madvise [never]\n", "never"),
                                       ("always madvise never\n", None)])
def test_thp_mode_reads_the_bracketed_word(tmp_path, text, mode):
  path = tmp_path / "enabled"
  path.write_text(text)
  assert host_memory.thp_mode(str(path)) == mode


def test_thp_mode_of_a_missing_file_is_none(tmp_path):
  assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def test_glibc_version_matches_the_c_library():
  version = host_memory.glibc_version()
  libc, libc_version = platform.libc_ver()
  if libc != "glibc":
    assert version is None
  else:
    assert version == tuple(int(part) for part in libc_version.split(".")[:2])


def test_with_hugetlb_keeps_other_tunables():
  assert host_memory.with_hugetlb(None) == "glibc.malloc.hugetlb=1"
  assert host_memory.with_hugetlb("") == "glibc.malloc.hugetlb=1"
  assert (host_memory.with_hugetlb("glibc.malloc.arena_max=2")
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


@pytest.mark.parametrize("environ,mode,glibc,system,expected", [
    ({}, "madvise", (2, 36), "Linux", True),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", (2, 35), "Linux", True),
    ({}, "always", (2, 36), "Linux", False),  # huge pages without asking
    ({}, "never", (2, 36), "Linux", False),  # no huge pages at all
    ({}, None, (2, 36), "Linux", False),
    ({}, "madvise", (2, 34), "Linux", False),  # glibc without the tunable
    ({}, "madvise", None, "Linux", False),  # musl and others
    ({}, "madvise", (2, 36), "Darwin", False),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36), "Linux", False),
    ({"GLIBC_TUNABLES": "a.b=1:glibc.malloc.hugetlb=1"}, "madvise", (2, 36), "Linux", False),
    ({"JAX_SEQGCN_HUGEPAGES": "0"}, "madvise", (2, 36), "Linux", False),
    ({"JAX_SEQGCN_HUGEPAGES": "off"}, "madvise", (2, 36), "Linux", False),
    ({"JAX_SEQGCN_HUGEPAGES": "1"}, "madvise", (2, 36), "Linux", True),
])
def test_should_reexec(environ, mode, glibc, system, expected):
  assert host_memory.should_reexec(environ, mode=mode, glibc=glibc, system=system) is expected


_SCRIPT = textwrap.dedent("""
    import os, sys
    print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
    from jax_seqgcn.runtime import host_memory
    host_memory.reexec_with_hugepages()
    print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:])
""")


@needs_madvise_thp
def test_restarts_once_in_place_with_the_tunable(tmp_path):
  script = tmp_path / "prog.py"
  script.write_text(_SCRIPT)
  out = subprocess.run([sys.executable, str(script), "--flag", "x y"], capture_output=True,
                       text=True, env=_env(GLIBC_TUNABLES="glibc.malloc.arena_max=4"),
                       timeout=300, check=True)
  lines = out.stdout.splitlines()
  assert len(lines) == 3, out.stdout + out.stderr
  pid = lines[0].split()[1]
  tunables = "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
  assert lines[0] == f"start {pid} glibc.malloc.arena_max=4 ['--flag', 'x y']"
  assert lines[1] == f"start {pid} {tunables} ['--flag', 'x y']"  # same process, same args
  assert lines[2] == f"after {pid} {tunables} ['--flag', 'x y']"
  assert out.stderr == ""  # silent


@needs_madvise_thp
def test_opt_out_keeps_the_process(tmp_path):
  script = tmp_path / "prog.py"
  script.write_text(_SCRIPT)
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       env=_env(JAX_SEQGCN_HUGEPAGES="0"), timeout=300, check=True)
  assert [line.split()[0] for line in out.stdout.splitlines()] == ["start", "after"]
  assert "None" in out.stdout.splitlines()[1]


_FAULTS = textwrap.dedent("""
    import ctypes, resource
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 256 * 2**20
    total = 0
    for _ in range(3):  # like XLA's per-run buffers: a large block, freed, allocated again
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      block = libc.malloc(size)
      ctypes.memset(block, 1, size)
      total += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
      libc.free(block)
    print(total)
""")


@needs_madvise_thp
def test_the_tunable_cuts_page_faults_of_large_blocks():
  """The mechanism the restart is for: 256 MiB blocks fault in 2 MiB pages, not 4 KiB ones."""
  def faults(**env):
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True,
                         env=_env(**env), timeout=120, check=True)
    return int(out.stdout)
  plain = faults()
  huge = faults(GLIBC_TUNABLES=host_memory.with_hugetlb(None))
  assert plain >= 3 * 256 * 2**20 // 4096 * 0.9  # one fault per 4 KiB page
  assert huge < plain / 8, (huge, plain)
