"""Kernels per platform: the CPU kernels on "cpu", plain Flax/XLA on GPU/TPU, the same function.

The accelerator path is forced on this CPU (`platform="gpu"`): its train-mode jaxpr has no
custom derivative rule (no `ConvReLUPool` or BatchNorm custom VJP, no `patch_matmul`, no
`jax.nn.relu` custom JVP), uses XLA's convolution and `reduce_window` max-pool, and gives the
CPU path's values and gradients; the CPU path keeps its custom kernels. `fit` and `inference`
bind the platform of their mesh's devices into the learner before tracing.
"""

import importlib
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_seqgcn import models
from jax_seqgcn import training
from jax_seqgcn.models import batchnorm
from jax_seqgcn.models import conv
from jax_seqgcn.models import layers
from jax_seqgcn.models.lossnet import LossNet
from jax_seqgcn.training import parallel
from jax_seqgcn.training import state as state_lib

# The modules (the package exports functions of the same names).
fit_lib = importlib.import_module("jax_seqgcn.training.fit")
inference_lib = importlib.import_module("jax_seqgcn.training.inference")

CUSTOM_RULES = re.compile(r"custom_vjp_call|custom_jvp_call")

# name, input shape, outputs: small images keep the compiles short; every layer kind is used.
# Batch 8: BatchNorm over the 1x1 maps of the last stages normalises 8 values, not too few for a
# float32 comparison (with 4, rounding differences grow to ~1e-4 in a few gradient entries).
LEARNERS = [("small_cnn", (8, 8, 8, 1), 10), ("resnet18", (8, 8, 8, 3), 10),
            ("vgg11", (8, 8, 8, 3), 10), ("deepprior", (8, 32, 32, 1), 6)]


def _learner(name, shape, num_outputs, platform):
  return models.get_learner(name, num_classes=num_outputs, channels=shape[-1], platform=platform)


def _abstract_variables(name, shape, num_outputs):
  module = _learner(name, shape, num_outputs, "cpu")
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _variables(name, shape, num_outputs, dtype=jnp.float32):
  """Variables drawn with NumPy (no compile of the slow threefry init), in `dtype`: torch-like
  uniform kernels and biases, BatchNorm scale ~1, bias ~0 and running statistics not 0/1."""
  rng = np.random.default_rng(1)

  def draw(path, leaf):
    kind = path[-1].key
    if kind in ("scale", "var"):
      values = rng.uniform(0.5, 1.5, leaf.shape)
    elif kind == "mean":
      values = rng.uniform(-0.5, 0.5, leaf.shape)
    else:
      fan_in = np.prod(leaf.shape[:-1]) if kind == "kernel" else 100
      values = rng.uniform(-1, 1, leaf.shape) / np.sqrt(fan_in)
    return jnp.asarray(values, dtype)

  return jax.tree_util.tree_map_with_path(draw, _abstract_variables(name, shape, num_outputs))


def _train_pass(module, weights):
  """`f(variables, x)`: train-mode forward + gradient, ((loss, (outputs, new batch_stats)),
  (d params, d x))."""

  def loss(params, x, variables):
    v = dict(variables, params=params)
    (outputs, embedding, stages), mutated = module.apply(v, x, train=True,
                                                         mutable=["batch_stats"])
    value = (jnp.sum(weights * outputs) + 1e-2 * jnp.sum(embedding ** 2)
             + sum(jnp.mean(jnp.sin(s)) for s in stages))
    return value, (outputs, mutated.get("batch_stats", {}))

  grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  return lambda variables, x: grad(variables["params"], x, variables)


def _inputs(shape, num_outputs, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 2)
  return (jax.random.normal(keys[0], shape, dtype),
          jax.random.normal(keys[1], (shape[0], num_outputs), dtype))


def _jaxprs(name, shape, num_outputs, platform):
  """(train-mode forward jaxpr, train-mode forward + gradient jaxpr) as text."""
  module = _learner(name, shape, num_outputs, platform)
  variables = _abstract_variables(name, shape, num_outputs)
  x, weights = _inputs(shape, num_outputs)
  forward = jax.make_jaxpr(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))
  both = jax.make_jaxpr(_train_pass(module, weights))
  return str(forward(variables, x)), str(both(variables, x))


@pytest.mark.parametrize("name, shape, num_outputs", LEARNERS)
def test_accelerator_path_is_plain_xla_and_cpu_path_keeps_its_kernels(name, shape, num_outputs):
  forward, both = _jaxprs(name, shape, num_outputs, "gpu")
  assert not CUSTOM_RULES.search(forward), set(CUSTOM_RULES.findall(forward))
  assert not CUSTOM_RULES.search(both), set(CUSTOM_RULES.findall(both))
  assert "conv_general_dilated" in both  # XLA's convolution, in training too
  if name != "resnet18":  # the others max-pool: Flax's reduce_window and its gradient
    assert "reduce_window_max" in both and "select_and_scatter_add" in both

  cpu_forward, cpu_both = _jaxprs(name, shape, num_outputs, "cpu")
  # The CPU kernels: ConvReLUPool / BatchNorm / patch_matmul custom VJPs, im2col in training.
  assert "custom_vjp_call" in cpu_forward
  assert "conv_general_dilated" not in cpu_both and "reduce_window" not in cpu_both
  # An unbound learner (platform None), applied directly, is the CPU one.
  assert _jaxprs(name, shape, num_outputs, None)[0] == cpu_forward


@pytest.mark.parametrize("platform", ["cuda", "rocm", "tpu"])
def test_every_accelerator_platform_name_gets_the_plain_path(platform):
  forward, both = _jaxprs("vgg11", (2, 4, 4, 3), 10, platform)
  assert _jaxprs("vgg11", (2, 4, 4, 3), 10, "gpu") == (forward, both)
  assert not CUSTOM_RULES.search(forward + both)


def _assert_trees_close(got, want, rtol):
  """Leafwise `rtol`, with an absolute floor of `rtol` x the tree's largest magnitude (terms
  that are zero in exact arithmetic, e.g. the gradient of a conv bias before a BatchNorm, are
  rounding noise)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  if not jax.tree.leaves(want):
    return
  scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol,
                               atol=rtol * scale)


def _compare_paths(name, shape, num_outputs, dtype, rtol):
  variables = _variables(name, shape, num_outputs, dtype)
  x, weights = _inputs(shape, num_outputs, dtype)
  results = {}
  for platform in ("cpu", "gpu"):
    module = _learner(name, shape, num_outputs, platform)
    train_pass = _train_pass(module, weights)
    # Evaluation mode too (CPU: XLA's convolution at top level; the running statistics).
    both = lambda v, x, m=module, f=train_pass: f(v, x) + (m.apply(v, x, train=False),)
    results[platform] = jax.jit(both)(variables, x)
  (value, (outputs, stats)), (grad_params, grad_x), evaluated = results["gpu"]
  (cpu_value, (cpu_outputs, cpu_stats)), (cpu_grad_params, cpu_grad_x), cpu_eval = results["cpu"]
  for got, want in [(value, cpu_value), (outputs, cpu_outputs), (stats, cpu_stats),
                    (grad_params, cpu_grad_params), (grad_x, cpu_grad_x),
                    (evaluated, cpu_eval)]:
    _assert_trees_close(got, want, rtol)


@pytest.mark.parametrize("name, shape, num_outputs", LEARNERS)
def test_accelerator_path_equals_cpu_path_in_float32(name, shape, num_outputs):
  _compare_paths(name, shape, num_outputs, jnp.float32, rtol=1e-4)


@pytest.mark.parametrize("name, shape, num_outputs", [
    case if case[0] in ("small_cnn", "deepprior") else pytest.param(*case, marks=pytest.mark.slow)
    for case in LEARNERS])
def test_accelerator_path_is_the_same_function_in_float64(name, shape, num_outputs):
  # In float64 the two paths agree to ~1e-12 (ResNet-18: 2e-12 measured), so the float32
  # differences are summation order. ResNet-18 and VGG-11 run with the slow tests.
  with jax.enable_x64(True):
    _compare_paths(name, shape, num_outputs, jnp.float64, rtol=1e-8)


@pytest.mark.parametrize("name, shape, num_outputs", LEARNERS)
def test_variables_have_the_same_names_and_shapes_on_every_platform(name, shape, num_outputs):
  def abstract(platform):
    module = _learner(name, shape, num_outputs, platform)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape), train=False))

  cpu = abstract("cpu")
  for platform in ("gpu", "tpu"):
    assert abstract(platform) == cpu  # same tree, shapes and dtypes: checkpoints are portable


def test_accelerator_batch_norm_is_flax_and_keeps_bfloat16():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  x = (jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 2 + 1).astype(jnp.bfloat16)

  class Net(nn.Module):
    platform: str
    train: bool = True

    @nn.compact
    def __call__(self, x):
      return layers.batch_norm(self.train, "bn", platform=self.platform)(x)

  results = {}
  for platform in ("cpu", "gpu"):
    variables = Net(platform).init(jax.random.key(1), x)
    y, updated = Net(platform).apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert updated["batch_stats"]["bn"]["mean"].dtype == jnp.float32
    assert variables["params"]["bn"]["scale"].dtype == jnp.float32
    results[platform] = (variables, y, updated)
  assert jax.tree.map(jnp.shape, results["cpu"][0]) == jax.tree.map(jnp.shape, results["gpu"][0])
  np.testing.assert_allclose(np.asarray(results["gpu"][1], np.float32),
                             np.asarray(results["cpu"][1], np.float32), atol=0.02)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               results["gpu"][2], results["cpu"][2])
  # The accelerator layer is Flax's own module, named as the CPU layer.
  plain = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                       dtype=jnp.bfloat16)
  expected, _ = plain.apply({k: v["bn"] for k, v in results["gpu"][0].items()}, x,
                            mutable=["batch_stats"])
  np.testing.assert_array_equal(np.asarray(results["gpu"][1], np.float32),
                                np.asarray(expected, np.float32))
  assert batchnorm.MOMENTUM == 0.9 and batchnorm.EPSILON == 1e-5


def test_learners_in_bfloat16_on_the_accelerator_path():
  for name, shape, num_outputs in LEARNERS:
    module = _learner(name, shape, num_outputs, "gpu")
    variables = _abstract_variables(name, shape, num_outputs)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16),
                          variables["params"])
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    (outputs, embedding, _), mutated = jax.eval_shape(
        lambda v, x, m=module: m.apply(v, x, train=True, mutable=["batch_stats"]),
        dict(variables, params=params), x)
    assert outputs.dtype == embedding.dtype == jnp.bfloat16
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(mutated))


def _stub_mesh(platform):
  device = types.SimpleNamespace(platform=platform)
  return types.SimpleNamespace(devices=np.array([device], dtype=object))


def test_bind_platform_takes_the_mesh_devices_platform_and_keeps_explicit_ones():
  unbound = models.get_learner("small_cnn", num_classes=10, channels=1)
  assert unbound.platform is None
  for platform in ("cpu", "gpu", "tpu"):
    bound = state_lib.bind_platform(unbound, _stub_mesh(platform))
    assert bound.platform == platform and bound.hidden == unbound.hidden
    assert bound == unbound.clone(platform=platform)  # equal clones: one jit cache entry
  explicit = models.get_learner("vgg11", num_classes=10, platform="gpu")
  assert state_lib.bind_platform(explicit, _stub_mesh("cpu")) is explicit
  other = LossNet()
  assert models.bind_platform(other, "gpu") is other  # no platform attribute: left alone
  assert state_lib.mesh_platform(parallel.make_mesh()) == jax.devices()[0].platform
  with pytest.raises(ValueError, match="platform must be"):
    models.get_learner("small_cnn", num_classes=10, platform="")


def _data(n=64, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n).astype(np.int32)
  images = np.where(labels[:, None, None, None] == 1, 200, 40) + rng.integers(
      0, 40, (n, 8, 8, 1))
  return images.astype(np.uint8), labels


# One setting for both fit tests: the unbound learner bound to "cpu" equals the explicit "cpu"
# one, so they share the cached compiles.
_FIT = dict(epochs=2, batch_size=16, learning_rate=0.05, milestones=())


def _small_cnn(platform=None):
  return models.get_learner("small_cnn", num_classes=2, channels=1, conv_features=(4, 8),
                            hidden=8, platform=platform)


def test_fit_and_inference_bind_the_mesh_platform_before_the_cached_jits(monkeypatch):
  seen = []
  for module, name in ((fit_lib, "_epoch_fn"), (inference_lib, "_forward_fn")):
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda model, *a, _f=original, **k: (
        seen.append(model.platform), _f(model, *a, **k))[1])
  images, labels = _data()
  model = _small_cnn()
  state = training.fit(jax.random.key(0), model, images, labels, **_FIT)
  training.predict(state, model, images, batch_size=32)
  assert seen == ["cpu", "cpu"]  # this CPU mesh's platform, bound into the model
  assert model.platform is None  # the caller's module is not changed


def test_fit_with_accelerator_kernels_on_cpu_trains_like_the_cpu_kernels():
  images, labels = _data()
  results = []
  for platform in ("cpu", "gpu"):
    model = _small_cnn(platform)
    state = training.fit(jax.random.key(0), model, images, labels, **_FIT)
    results.append((state.params, training.predict(state, model, images, batch_size=32)))
  _assert_trees_close(results[1][0], results[0][0], rtol=1e-4)
  np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-4)


def test_the_environment_does_not_choose_the_kernels(monkeypatch):
  # The old process-wide override is gone: the platform attribute alone decides.
  monkeypatch.setenv("JAX_SEQGCN_CONV_IMPL", "xla")
  forward, both = _jaxprs("small_cnn", (2, 8, 8, 1), 10, "cpu")
  assert "custom_vjp_call" in forward and "conv_general_dilated" not in both
  assert not hasattr(conv, "impl_scope") and not hasattr(conv, "ENV_VAR")
