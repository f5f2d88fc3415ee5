"""Mixed precision for the learner: float32 parameters, activations in a compute dtype.

`config.train.compute_dtype` (and the `compute_dtype` argument of `training.fit`, `evaluate`,
`forward_pool`...) is "float32" (default, exact) or "bfloat16". With bfloat16:

  * parameters, gradients and the optimiser state stay float32 (the master copy); each step
    casts the parameters to bfloat16 for the forward pass, and the gradient flows back through
    the cast to float32;
  * the preprocessed images, activations, convolutions and matrix products are bfloat16;
  * BatchNorm statistics, running averages and normalisation are float32
    (`jax_seqgcn.models.batchnorm`), and so are the loss, the metrics and everything returned
    (logits, embeddings, probabilities are cast back to float32).

bfloat16 has float32's exponent range, so no loss scaling is needed. It is meant for GPUs and
TPUs, whose matrix units run bfloat16 at 2-16x the float32 rate; we expect (not measured here:
no accelerator) up to ~2x faster learner training there, mostly from halved memory traffic. On
CPUs without native bfloat16 arithmetic (such as our 2-core AVX2 machine) it is slower than
float32: keep the default there.
"""

from typing import Any

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = ("float32", "bfloat16")


def check_compute_dtype(name: Any) -> str:
  """Returns `name` if it is one of `COMPUTE_DTYPES`; raises ValueError otherwise."""
  if not isinstance(name, str) or name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
  return name


def cast_floating(tree: Any, dtype) -> Any:
  """Casts the floating-point leaves of `tree` to `dtype` (integer leaves are kept).

  Args:
    tree: pytree of arrays (e.g. parameters or a batch of activations).
    dtype: target floating dtype.
  Returns:
    The same tree; a no-op (same leaves) when they already have `dtype`.
  """
  def cast(x):
    if jnp.issubdtype(jnp.result_type(x), jnp.floating) and jnp.result_type(x) != dtype:
      return jnp.asarray(x).astype(dtype)
    return x
  return jax.tree.map(cast, tree)


def to_float32(tree: Any) -> Any:
  """Casts floating leaves of lower precision (bfloat16, float16) up to float32."""
  def cast(x):
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
      return jnp.asarray(x).astype(jnp.float32)
    return x
  return jax.tree.map(cast, tree)
