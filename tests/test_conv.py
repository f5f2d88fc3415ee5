"""im2col convolution equals XLA's, in value and gradient, and learners agree across impls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_seqgcn import models
from jax_seqgcn.models import conv


@pytest.mark.parametrize("k, stride, padding, size", [(3, 1, 1, 7), (3, 2, 1, 8), (1, 2, 0, 8),
                                                      (5, 1, 2, 9), (3, 1, 0, 6), (3, 2, 1, 7)])
def test_im2col_equals_xla_conv(k, stride, padding, size):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  w = jax.random.normal(jax.random.key(1), (k, k, 3, 5))
  expected = conv.xla_conv(x, w, stride=stride, padding=padding)
  np.testing.assert_allclose(conv.im2col_conv(x, w, stride=stride, padding=padding), expected,
                             atol=2e-5)

  def loss(fn, x, w):
    return jnp.sum(jnp.sin(fn(x, w, stride=stride, padding=padding)))
  for argnum in (0, 1):
    np.testing.assert_allclose(jax.grad(loss, argnum + 1)(conv.im2col_conv, x, w),
                               jax.grad(loss, argnum + 1)(conv.xla_conv, x, w), atol=1e-4)


def test_auto_is_im2col_on_cpu_and_env_overrides(monkeypatch):
  assert conv.resolve_impl("auto") == ("im2col" if jax.default_backend() == "cpu" else "xla")
  monkeypatch.setenv(conv.ENV_VAR, "xla")
  assert conv.resolve_impl("auto") == "xla"
  assert conv.resolve_impl("im2col") == "im2col"
  monkeypatch.delenv(conv.ENV_VAR)
  with conv.impl_scope("xla"):
    assert conv.resolve_impl("auto") == "xla"
    assert conv.resolve_impl("im2col") == "im2col"
  assert conv.resolve_impl("auto") == ("im2col" if jax.default_backend() == "cpu" else "xla")
  with pytest.raises(ValueError, match="conv impl"):
    conv.resolve_impl("fft")


def test_resnet_outputs_do_not_depend_on_impl(monkeypatch):
  model = models.get_learner("resnet18", num_classes=10, channels=3)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  monkeypatch.setenv(conv.ENV_VAR, "xla")
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(1))
  ref_out, ref_emb, _ = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
  monkeypatch.setenv(conv.ENV_VAR, "im2col")
  out, emb, _ = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
  np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(emb, ref_emb, rtol=1e-4, atol=1e-4)
