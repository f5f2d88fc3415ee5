"""Tests of jax_seqgcn.runtime.host_memory: when to restart with huge pages (CPU runs only), the
restart, the environment its children see, the gain."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from jax_seqgcn.runtime import host_memory

QUALIFIES = host_memory.should_reexec({"JAX_PLATFORMS": "cpu"}, mode=host_memory.thp_mode(),
                                      glibc=host_memory.glibc_version(),
                                      system=platform.system())
needs_madvise_thp = pytest.mark.skipif(
    not QUALIFIES, reason="needs Linux, glibc >= 2.35 and transparent huge pages in madvise mode")


def _env(**changes):
  """This environment without the variables under test, plus `changes`; a CPU run by default."""
  env = {k: v for k, v in os.environ.items()
         if k not in (host_memory.ENV_VAR, host_memory.OPT_OUT_VAR, host_memory.RESTORE_VAR,
                      host_memory.PLATFORMS_VAR)}
  env[host_memory.PLATFORMS_VAR] = "cpu"
  env.update(changes)
  return {k: v for k, v in env.items() if v is not None}


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
    # GPU and TPU jobs never restart: JAX_PLATFORMS's first entry is the default backend.
    ({"JAX_PLATFORMS": "cuda"}, "madvise", (2, 36), "Linux", False),
    ({"JAX_PLATFORMS": "gpu"}, "madvise", (2, 36), "Linux", False),
    ({"JAX_PLATFORMS": "tpu,cpu"}, "madvise", (2, 36), "Linux", False),
    ({"JAX_PLATFORMS": "rocm"}, "madvise", (2, 36), "Linux", False),
    ({"JAX_PLATFORMS": "cpu"}, "madvise", (2, 36), "Linux", True),
    ({"JAX_PLATFORMS": " CPU , cuda"}, "madvise", (2, 36), "Linux", True),
])
def test_should_reexec(environ, mode, glibc, system, expected):
  assert host_memory.should_reexec(environ, mode=mode, glibc=glibc, system=system) is expected


@pytest.mark.parametrize("environ,accelerator,expected", [
    ({}, False, True),
    ({}, True, False),  # a GPU/TPU is there and JAX would take it: no restart
    ({"JAX_PLATFORMS": ""}, True, False),
    ({"JAX_PLATFORMS": "cpu"}, True, True),  # the user asked for the CPU backend
    ({"JAX_PLATFORMS": "cuda"}, False, False),
])
def test_only_cpu_runs_restart(environ, accelerator, expected):
  assert host_memory.cpu_run(environ, accelerator=accelerator) is expected
  assert host_memory.should_reexec(environ, mode="madvise", glibc=(2, 36), system="Linux",
                                   accelerator=accelerator) is expected


@pytest.mark.parametrize("plugins,files,environ,expected", [
    ([], ["/dev/nvidiactl", "/dev/nvidia0", "/dev/accel0"], {}, False),  # no plugin: CPU
    (["xla_cuda12"], ["/dev/nvidiactl", "/dev/nvidia0"], {}, True),
    (["cuda"], ["/dev/nvidia1"], {}, True),
    (["xla_cuda12"], [], {}, False),  # plugin but no GPU: JAX falls back to the CPU
    (["xla_cuda12"], ["/dev/nvidiactl"], {"CUDA_VISIBLE_DEVICES": ""}, False),
    (["xla_cuda12"], ["/dev/nvidiactl"], {"CUDA_VISIBLE_DEVICES": "-1"}, False),
    (["xla_cuda12"], ["/dev/nvidiactl"], {"CUDA_VISIBLE_DEVICES": "0"}, True),
    (["xla_rocm"], ["/dev/kfd"], {}, True),
    (["xla_rocm"], [], {}, False),
    (["libtpu"], ["/dev/accel0"], {}, True),
    (["libtpu"], ["/dev/vfio/0"], {}, True),
    (["libtpu"], ["/dev/nvidiactl"], {}, False),
    (["some_other_chip"], [], {}, True),  # unknown plugin: assume its device, keep the process
])
def test_accelerator_present_from_plugins_and_device_nodes(plugins, files, environ, expected):
  import fnmatch  # pylint: disable=import-outside-toplevel
  got = host_memory.accelerator_present(
      environ, plugins=plugins, exists=lambda path: path in files,
      glob=lambda pattern: [f for f in files if fnmatch.fnmatch(f, pattern)])
  assert got is expected


def test_accelerator_present_agrees_with_jax_without_starting_it():
  script = textwrap.dedent(f"""
      import importlib.util, os, sys
      spec = importlib.util.spec_from_file_location("host_memory", {host_memory.__file__!r})
      host_memory = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(host_memory)
      present = host_memory.accelerator_present(os.environ)
      assert "jax" not in sys.modules  # decided without importing JAX, let alone a backend
      import jax
      print(present, jax.default_backend())
  """)
  env = _env(JAX_PLATFORMS=None)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=300, check=True)
  present, backend = out.stdout.split()
  assert present == str(backend != "cpu"), out.stdout


_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys
    print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
    from jax_seqgcn.runtime import host_memory
    host_memory.reexec_with_hugepages()
    host_memory.reexec_with_hugepages()  # a second call does nothing
    print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:])
    print("in effect", host_memory.process_tunables())
    print("record", os.environ.get(host_memory.RESTORE_VAR))
    child = "import os; print(os.environ.get('GLIBC_TUNABLES'))"
    print("child", subprocess.run([sys.executable, "-c", child], capture_output=True,
                                  text=True, check=True).stdout.strip())
    print("asking child", subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, check=True,
        env=host_memory.environ_with_process_tunables()).stdout.strip())
""")


def _run_script(tmp_path, *args, **env):
  script = tmp_path / "prog.py"
  script.write_text(_SCRIPT)
  out = subprocess.run([sys.executable, str(script)] + list(args), capture_output=True,
                       text=True, env=_env(**env), timeout=300, check=True)
  return out.stdout.splitlines(), out.stderr


@needs_madvise_thp
@pytest.mark.parametrize("original", ["glibc.malloc.arena_max=4", "", None])
def test_restarts_once_in_place_and_children_do_not_inherit_the_tunable(tmp_path, original):
  lines, stderr = _run_script(tmp_path, "--flag", "x y", GLIBC_TUNABLES=original)
  assert len(lines) == 7, "\n".join(lines) + stderr
  pid = lines[0].split()[1]
  tunables = host_memory.with_hugetlb(original)
  assert lines[0] == f"start {pid} {original} ['--flag', 'x y']"
  assert lines[1] == f"start {pid} {tunables} ['--flag', 'x y']"  # same process, same args
  # Restored for whatever the program spawns; glibc started with (and keeps) the tunable.
  assert lines[2] == f"after {pid} {original} ['--flag', 'x y']"
  assert lines[3] == f"in effect {tunables}"
  assert lines[4] == "record None"
  assert lines[5] == f"child {original}"
  assert lines[6] == f"asking child {tunables}"  # a child that asks gets the same settings
  assert stderr == ""  # silent


@needs_madvise_thp
@pytest.mark.parametrize("platforms", ["cuda", "tpu", "gpu,cpu"])
def test_gpu_and_tpu_jobs_keep_their_process(tmp_path, platforms):
  lines, stderr = _run_script(tmp_path, JAX_PLATFORMS=platforms)
  assert [line.split()[0] for line in lines] == ["start", "after", "in", "record", "child",
                                                 "asking"], "\n".join(lines) + stderr
  assert lines[1].split()[2] == "None" and lines[2] == "in effect None"


def test_restore_environment_only_for_this_process():
  environ = {host_memory.RESTORE_VAR: "123:glibc.malloc.arena_max=2",
             host_memory.ENV_VAR: "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
  assert host_memory.restore_environment(environ, 123) is True
  assert environ == {host_memory.ENV_VAR: "glibc.malloc.arena_max=2"}
  environ = {host_memory.RESTORE_VAR: "123", host_memory.ENV_VAR: "glibc.malloc.hugetlb=1"}
  assert host_memory.restore_environment(environ, 123) is True and environ == {}
  environ = {host_memory.RESTORE_VAR: "123:", host_memory.ENV_VAR: "glibc.malloc.hugetlb=1"}
  assert host_memory.restore_environment(environ, 123) is True
  assert environ == {host_memory.ENV_VAR: ""}
  # A record inherited from another process is dropped, the variable left alone.
  environ = {host_memory.RESTORE_VAR: "99", host_memory.ENV_VAR: "glibc.malloc.hugetlb=1"}
  assert host_memory.restore_environment(environ, 123) is False
  assert environ == {host_memory.ENV_VAR: "glibc.malloc.hugetlb=1"}
  assert host_memory.restore_environment({}, 123) is False


@needs_madvise_thp
def test_opt_out_keeps_the_process(tmp_path):
  lines, _ = _run_script(tmp_path, JAX_SEQGCN_HUGEPAGES="0")
  assert [line.split()[0] for line in lines][:2] == ["start", "after"]
  assert "None" in lines[1]


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
