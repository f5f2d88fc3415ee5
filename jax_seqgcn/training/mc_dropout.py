"""Monte Carlo dropout passes of a trained learner (BALD's T stochastic predictions).

A classification learner built with `dropout_rate` > 0 (`models.get_learner(...,
dropout_rate=...)`, `config.learner.mc_dropout`) has one dropout layer, between its embedding
and its Dense `head`, active in training. Its BatchNorm runs in eval mode in the MC passes, so
the embedding [N, D] is the same in all T passes and only the head's input changes: each pass
is `softmax(head(dropout_t(embedding)))`. `mc_dropout_probabilities` computes exactly that from
the eval-mode embeddings the cycle already has, in one jitted program over the T keys: T
[N, D] x [D, C] products instead of T full forward passes (the same distribution as baal's
`MCDropoutModule`, which reruns the whole network).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Full float32 products on every backend: the probabilities feed the selection.
HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("samples",))
def _mc_probabilities(key, kernel, bias, embedding, rate, *, samples):
  keep = 1.0 - rate

  def one_pass(t):
    mask = jax.random.bernoulli(jax.random.fold_in(key, t), keep, embedding.shape)
    dropped = jnp.where(mask, embedding / keep, 0.0)  # inverted dropout, as flax's
    logits = jnp.matmul(dropped, kernel, precision=HIGHEST) + bias
    return jax.nn.softmax(logits, axis=-1)

  return jax.lax.map(one_pass, jnp.arange(samples))


def mc_dropout_probabilities(key: jax.Array, head_params, embedding, rate: float,
                             samples: int) -> jax.Array:
  """T class-probability predictions with dropout before the head, as [T, N, C] float32.

  Args:
    key: PRNG key; pass t draws its mask from fold_in(key, t).
    head_params: the learner's `params["head"]` ({"kernel": [D, C], "bias": [C]}).
    embedding: [N, D] eval-mode embeddings (`training.forward_pool`'s).
    rate: the learner's dropout rate, in (0, 1).
    samples: T >= 1, the number of stochastic passes.
  Returns:
    [T, N, C] float32, each [N, C] slice rows summing to 1.
  Raises:
    ValueError: a rate outside (0, 1) or T < 1.
  """
  if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) \
      or not 0.0 < rate < 1.0:
    raise ValueError(f"the MC dropout rate must be in (0, 1), got {rate!r}")
  if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
    raise ValueError(f"samples must be an int >= 1, got {samples!r}")
  embedding = jnp.asarray(embedding, jnp.float32)
  kernel = jnp.asarray(head_params["kernel"], jnp.float32)
  bias = jnp.asarray(head_params["bias"], jnp.float32)
  chex.assert_rank(embedding, 2)
  chex.assert_shape(kernel, (embedding.shape[1], None))
  return _mc_probabilities(key, kernel, bias, embedding, jnp.float32(rate), samples=int(samples))
