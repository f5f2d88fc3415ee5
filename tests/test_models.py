"""Tests for jax_seqgcn.models: parameter counts, shapes, BatchNorm modes, inits, registry."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_seqgcn import models
from jax_seqgcn.models import layers


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _abstract_variables(module, shape):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)


def _host_variables(abstract, seed=0):
  """Concrete variables drawn with NumPy: XLA compiles threefry-based `init` slowly on CPU."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name == "mean":
      return jnp.zeros(leaf.shape, leaf.dtype)
    bound = 1.0 / math.sqrt(np.prod(leaf.shape[:-1])) if name == "kernel" else 0.1
    return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _abstract_outputs(module, variables, shape, train):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  mutable = ["batch_stats"] if train and "batch_stats" in variables else False

  def apply(variables, x):
    return module.apply(variables, x, train=train, mutable=mutable)

  out = jax.eval_shape(apply, variables, x)
  return out[0] if mutable else out


@pytest.mark.parametrize("channels, expected", [(3, 11_173_962), (1, 11_172_810)])
def test_resnet18_param_count_matches_pytorch(channels, expected):
  variables = _abstract_variables(models.ResNet18(num_classes=10), (1, 32, 32, channels))
  assert _count(variables["params"]) == expected
  # running mean + var of every BN: stem 64, stages 2*2*(64+128+256+512), shortcuts 128+256+512.
  assert _count(variables["batch_stats"]) == 2 * (64 + 4 * (64 + 128 + 256 + 512) + 896)


def test_vgg11_param_count():
  variables = _abstract_variables(models.VGG11(num_classes=10), (1, 32, 32, 3))
  convs = (3 * 64 + 64 * 128 + 128 * 256 + 256 * 256 + 256 * 512 + 3 * 512 * 512) * 9 + 2752
  assert _count(variables["params"]) == convs + 2 * 2752 + 512 * 10 + 10 == 9_231_114


def test_small_cnn_param_count_by_hand():
  variables = _abstract_variables(models.SmallCNN(num_classes=10), (1, 28, 28, 1))
  by_hand = (9 * 1 * 32 + 32) + (9 * 32 * 64 + 64) + (64 * 7 * 7 * 128 + 128) + (128 * 10 + 10)
  assert by_hand == 421_642
  assert _count(variables["params"]) == by_hand
  assert set(variables) == {"params"}  # no BatchNorm, no batch_stats


def test_deepprior_param_count():
  variables = _abstract_variables(models.DeepPrior(num_joints=16), (1, 128, 128, 1))
  convs = 25 * 8 + 25 * 8 * 16 + 9 * 16 * 32 + 9 * 32 * 64
  bn = 2 * (8 + 16 + 32 + 64)
  fcs = (1024 * 1024 + 1024) * 2 + 1024 * 48 + 48
  assert _count(variables["params"]) == convs + bn + fcs == 2_175_080


_CASES = [
    # name, input shape, num_classes, output width, embedding dim, stage feature shapes
    ("resnet18", (2, 32, 32, 3), 10, 10, 512,
     [(2, 32, 32, 64), (2, 16, 16, 128), (2, 8, 8, 256), (2, 4, 4, 512)]),
    ("resnet18", (2, 28, 28, 1), 10, 10, 512,
     [(2, 28, 28, 64), (2, 14, 14, 128), (2, 7, 7, 256), (2, 4, 4, 512)]),
    ("vgg11", (2, 32, 32, 3), 100, 100, 512,
     [(2, 16, 16, 64), (2, 8, 8, 128), (2, 4, 4, 256), (2, 2, 2, 512)]),
    ("vgg11", (2, 28, 28, 1), 10, 10, 512,
     [(2, 14, 14, 64), (2, 7, 7, 128), (2, 4, 4, 256), (2, 2, 2, 512)]),
    ("small_cnn", (2, 28, 28, 1), 10, 10, 128,
     [(2, 28, 28, 32), (2, 14, 14, 32), (2, 14, 14, 64), (2, 7, 7, 64)]),
    ("small_cnn", (2, 32, 32, 3), 10, 10, 128,
     [(2, 32, 32, 32), (2, 16, 16, 32), (2, 16, 16, 64), (2, 8, 8, 64)]),
    ("deepprior", (2, 128, 128, 1), 48, 48, 1024,
     [(2, 32, 32, 8), (2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64)]),
]


@pytest.mark.parametrize("name, shape, num_classes, out_dim, emb_dim, stage_shapes", _CASES)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("platform", [None, "gpu"])
def test_output_shapes(name, shape, num_classes, out_dim, emb_dim, stage_shapes, train, platform):
  module = models.get_learner(name, num_classes=num_classes, channels=shape[-1],
                              platform=platform)
  variables = _abstract_variables(module, shape)
  outputs, embedding, stage_features = _abstract_outputs(module, variables, shape, train)
  assert outputs.shape == (shape[0], out_dim)
  assert embedding.shape == (shape[0], emb_dim)
  assert isinstance(stage_features, tuple) and len(stage_features) == 4
  assert [f.shape for f in stage_features] == stage_shapes
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves((outputs, embedding, stage_features)))


# Smaller widths keep the real (non-abstract) forward passes fast; the code path is the same.
_BN_CASES = [
    (models.ResNet(num_classes=10, stage_features=(8, 16, 16, 32)), (4, 32, 32, 3)),
    (models.ResNet18(num_classes=10), (2, 28, 28, 1)),
    (models.VGG(num_classes=10, cfg=(8, "M", 16, "M", 16, "M", 32, "M", 32, "M")), (4, 28, 28, 1)),
    (models.DeepPrior(num_joints=16, hidden=(64, 32)), (4, 128, 128, 1)),
]


@pytest.mark.parametrize("module, shape", _BN_CASES)
@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_batch_stats_update_only_in_train_mode(module, shape, platform):
  module = module.clone(platform=platform)  # CPU kernels, or Flax's BatchNorm and XLA's ops
  x = jnp.asarray(np.random.default_rng(1).normal(1.0, 2.0, shape), jnp.float32)
  variables = _host_variables(_abstract_variables(module, shape))
  assert set(variables) == {"params", "batch_stats"}

  @jax.jit
  def forward(variables, x):
    eval_out, eval_state = module.apply(variables, x, train=False, mutable=["batch_stats"])
    plain_eval = module.apply(variables, x, train=False)  # no mutable collections needed
    train_out, train_state = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return eval_out, eval_state, plain_eval, train_out, train_state

  eval_out, eval_state, plain_eval, train_out, train_state = forward(variables, x)
  jax.tree.map(np.testing.assert_array_equal, eval_state["batch_stats"], variables["batch_stats"])
  np.testing.assert_allclose(plain_eval[0], eval_out[0], rtol=1e-6)
  for old, new in zip(jax.tree.leaves(variables["batch_stats"]),
                      jax.tree.leaves(train_state["batch_stats"])):
    assert not np.allclose(old, new)
  assert np.all(np.isfinite(train_out[0]))
  # Train mode normalises with batch statistics, so outputs differ from eval mode.
  assert not np.allclose(train_out[1], eval_out[1])


def test_small_cnn_matches_numpy_forward():
  module = models.SmallCNN(num_classes=10)
  x = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 28, 28, 1)), jnp.float32)
  variables = _host_variables(_abstract_variables(module, x.shape), seed=3)
  logits, embedding, stages = jax.jit(lambda v, x: module.apply(v, x, train=True))(variables, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])

  def conv_relu(inputs, kernel, bias):  # 3x3, pad 1, NHWC
    padded = np.pad(inputs, ((0, 0), (1, 1), (1, 1), (0, 0)))
    height, width = inputs.shape[1:3]
    out = sum(np.einsum("bhwc,co->bhwo", padded[:, i:i + height, j:j + width], kernel[i, j])
              for i in range(3) for j in range(3))
    return np.maximum(out + bias, 0.0)

  def pool(inputs):
    b, h, w, c = inputs.shape
    return inputs.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

  h1 = conv_relu(np.asarray(x, np.float64), p["conv1"]["kernel"], p["conv1"]["bias"])
  h2 = conv_relu(pool(h1), p["conv2"]["kernel"], p["conv2"]["bias"])
  flat = pool(h2).reshape(2, -1)
  emb = np.maximum(flat @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0.0)
  np.testing.assert_allclose(stages[0], h1, atol=1e-5)
  np.testing.assert_allclose(stages[3], pool(h2), atol=1e-5)
  np.testing.assert_allclose(embedding, emb, atol=1e-5)
  np.testing.assert_allclose(logits, emb @ p["head"]["kernel"] + p["head"]["bias"], atol=1e-5)


def test_torch_default_init_bounds():
  variables = models.SmallCNN(num_classes=10).init(
      jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)["params"]
  for layer, fan_in in [("conv1", 9), ("conv2", 9 * 32), ("fc1", 3136), ("head", 128)]:
    bound = 1.0 / math.sqrt(fan_in)
    for kind in ("kernel", "bias"):
      values = np.asarray(variables[layer][kind])
      assert np.abs(values).max() <= bound + 1e-7
    kernel = np.asarray(variables[layer]["kernel"])
    if kernel.size > 10_000:  # U(-b, b) has std b / sqrt(3)
      assert abs(kernel.std() - bound / math.sqrt(3)) < 0.02 * bound
  init = layers.torch_bias_init(4)
  values = np.asarray(init(jax.random.key(5), (10_000,)))
  assert values.min() >= -0.5 and values.max() <= 0.5 and values.max() > 0.49


def test_bn_init_is_identity_affine():
  variables = layers.batch_norm(train=False).init(jax.random.key(0), jnp.zeros((2, 5)))
  np.testing.assert_array_equal(variables["params"]["scale"], 1.0)
  np.testing.assert_array_equal(variables["params"]["bias"], 0.0)
  abstract = _abstract_variables(models.ResNet18(), (1, 32, 32, 3))
  assert "bias" not in abstract["params"]["stem_conv"]  # convs without bias, like the reference


def test_get_learner():
  assert set(models.LEARNERS) == {"resnet18", "vgg11", "deepprior", "small_cnn"}
  with pytest.raises(ValueError, match="resnet18.*small_cnn|small_cnn.*resnet18"):
    models.get_learner("resnet50", num_classes=10)
  with pytest.raises(ValueError, match="divisible by 3"):
    models.get_learner("deepprior", num_classes=47, channels=1)
  assert models.get_learner("deepprior", num_classes=48, channels=1).num_joints == 16
  module = models.get_learner("small_cnn", num_classes=7, channels=1, hidden=32)
  assert isinstance(module, models.SmallCNN) and module.hidden == 32
  assert module.platform is None  # bound by fit/inference to their mesh's platform
  for name in models.LEARNERS:
    learner = models.get_learner(name, num_classes=48, channels=1, platform="tpu")
    assert learner.platform == "tpu"
    assert models.bind_platform(learner, "cpu") is learner  # an explicit choice is kept
    assert models.bind_platform(learner.clone(platform=None), "gpu").platform == "gpu"
  with pytest.raises(AssertionError):  # channel count is checked against the input
    _abstract_variables(module, (1, 28, 28, 3))


# Smallest input sizes: small_cnn pools twice by 2, deepprior by 4, 2, 2, 2; resnet18 (padded
# stride-2 convs) and vgg11 ("SAME" pools) keep at least one pixel of any input.
_MIN_SIZES = [("small_cnn", 1, 4), ("deepprior", 1, 32), ("resnet18", 3, 1), ("vgg11", 3, 1)]


@pytest.mark.parametrize("name, channels, minimum", _MIN_SIZES)
@pytest.mark.parametrize("platform", [None, "tpu"])
def test_min_image_size_is_the_smallest_that_runs(name, channels, minimum, platform):
  assert models.min_image_size(name) == minimum
  module = models.get_learner(name, num_classes=48 if name == "deepprior" else 10,
                              channels=channels, platform=platform)
  shape = (1, minimum, minimum + 3, channels)
  models.check_input_shape(name, shape[1:])
  outputs, embedding, _ = _abstract_outputs(module, _abstract_variables(module, shape), shape,
                                            False)
  assert outputs.shape[0] == embedding.shape[0] == 1
  # One pixel less: the module itself now says so (Flax used to raise ZeroDivisionError).
  with pytest.raises(ValueError, match=f"'{type(module).__name__}' needs images of at least "
                                       f"{minimum}x{minimum} pixels"):
    _abstract_variables(module, (1, minimum - 1, minimum + 3, channels))


@pytest.mark.parametrize("name, image_shape, match", [
    ("small_cnn", (2, 2, 1), "learner 'small_cnn' needs images of at least 4x4 pixels .*got 2x2"),
    ("small_cnn", (28, 3, 1), "at least 4x4 pixels .*got 28x3"),
    ("deepprior", (16, 16, 1), "learner 'deepprior' needs images of at least 32x32 pixels"),
    ("resnet18", (0, 32, 3), "learner 'resnet18' needs images of at least 1x1 pixels"),
    ("vgg11", (32, 0, 3), "learner 'vgg11' needs images of at least 1x1 pixels"),
    ("vgg11", (32, 32), "shape \\[H, W, C\\]"),
    ("small_cnn", (28, 28, 0), "at least one channel"),
    ("mlp", (28, 28, 1), "Unknown learner 'mlp'"),
])
def test_check_input_shape_rejects(name, image_shape, match):
  with pytest.raises(ValueError, match=match):
    models.check_input_shape(name, image_shape)


def test_get_learner_checks_image_shape_when_given():
  with pytest.raises(ValueError, match="'small_cnn' needs images of at least 4x4"):
    models.get_learner("small_cnn", num_classes=10, channels=1, image_shape=(2, 2, 1))
  with pytest.raises(ValueError, match="built for 3 channels"):
    models.get_learner("resnet18", num_classes=10, channels=3, image_shape=(32, 32, 1))
  module = models.get_learner("small_cnn", num_classes=10, channels=1, image_shape=(4, 4, 1))
  assert isinstance(module, models.SmallCNN)


def test_min_image_size_follows_deepprior_stages():
  # conv 5 (pad 2) + pool 2, conv 4 (pad 2: +1 pixel) + pool 2, conv 3 + no pool, conv 3 + pool 2.
  stages = ((5, 8, 2), (4, 16, 2), (3, 32, 1), (3, 64, 2))
  assert models.min_image_size("deepprior", stages=stages) == 6
  module = models.DeepPrior(num_joints=2, stages=stages, hidden=(8,))
  assert _abstract_outputs(module, _abstract_variables(module, (1, 6, 6, 1)), (1, 6, 6, 1),
                           False)[0].shape == (1, 6)
  with pytest.raises(ValueError, match="at least 6x6"):
    _abstract_variables(module, (1, 5, 6, 1))


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_equals_flax_in_value_gradient_and_statistics(train):
  import flax.linen as nn
  from jax_seqgcn.models.batchnorm import BatchNorm
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3), jnp.float64) * 3 + 1
    weights = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)
    params = {"scale": jnp.array([1.5, 0.5, 2.0]), "bias": jnp.array([0.1, -0.2, 0.3])}
    stats = {"mean": jnp.array([0.5, 0.0, -1.0]), "var": jnp.array([2.0, 1.0, 0.5])}

    def objective(module):
      def f(params, x):
        y, updated = module.apply({"params": params, "batch_stats": stats}, x,
                                  mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y) * weights), updated
      return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)

    ours = objective(BatchNorm(use_running_average=not train))
    flax = objective(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12),
                 ours, flax)
    if train:  # the running statistics moved
      assert not np.allclose(ours[0][1]["batch_stats"]["mean"], stats["mean"])


def test_batchnorm_keeps_float32_statistics_for_bfloat16_input():
  from jax_seqgcn.models.batchnorm import BatchNorm
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)).astype(jnp.bfloat16)
  variables = BatchNorm().init(jax.random.key(1), x)
  y, updated = BatchNorm().apply(variables, x, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  assert updated["batch_stats"]["mean"].dtype == jnp.float32
  assert variables["params"]["scale"].dtype == jnp.float32
  expected = (x.astype(jnp.float32) - x.astype(jnp.float32).mean((0, 1, 2))) / jnp.sqrt(
      x.astype(jnp.float32).var((0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(y.astype(jnp.float32), expected, atol=0.02)
