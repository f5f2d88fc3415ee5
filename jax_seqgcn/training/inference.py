"""Eval-mode passes of a trained learner: predictions, embeddings, the sampler's pool fields, tests.

Every pass runs over fixed-size batches (one compile for any number of images), each gathered
from the host images when it runs (a memory-mapped pool is never read whole), without
augmentation, with the learner's BatchNorm statistics, and returns host NumPy arrays. A learner
whose `platform` is None runs with the kernels of the mesh's devices (`models.bind_platform`);
its eval-mode pass (`train=False`) uses XLA's own convolution on every platform, the faster at
top level on CPU too (`models.conv.conv_impl`).
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_seqgcn.training import augment
from jax_seqgcn.training import parallel
from jax_seqgcn.training import precision
from jax_seqgcn.training.state import TRACE_COUNTS
from jax_seqgcn.training.state import TrainState
from jax_seqgcn.training.state import _check_hashable
from jax_seqgcn.training.state import bind_platform
from jax_seqgcn.training.state import check_task
from jax_seqgcn.training.state import check_inputs

# Batches of an eval pass dispatched but not yet fetched: the pass holds at most this many
# batches' inputs and outputs besides the one being gathered, and still overlaps the host's
# gathering with the device's work.
_IN_FLIGHT = 2


def _host_rows(images):
  """`images` to gather batches from: a lazy row view (`data.stream.RowView`, e.g. a
  memory-mapped npz pool: its rows are read batch by batch) as it is, anything else as
  `np.asarray` (no copy for a NumPy array or `np.memmap`)."""
  return images if getattr(images, "lazy_rows", False) else np.asarray(images)


def _variables(state: TrainState) -> dict:
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables


@functools.lru_cache(maxsize=32)
def _forward_fn(model, spec, mesh, loss_net=None, compute_dtype="float32"):
  dtype = jnp.dtype(compute_dtype)

  def forward(variables, images):
    TRACE_COUNTS["forward"] += 1
    x = augment.apply_spec(None, images, spec, train=False).astype(dtype)
    learner = dict(variables["learner"], params=precision.cast_floating(
        variables["learner"]["params"], dtype))
    outputs, embedding, stage_features = precision.to_float32(
        model.apply(learner, x, train=False))
    if loss_net is None:
      return outputs, embedding
    return outputs, embedding, loss_net.apply({"params": variables["loss_net"]}, stage_features)

  return jax.jit(forward, in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))


def _forward(state, model, images, indices, *, batch_size, preprocessing, mesh,
             with_losses=False, compute_dtype="float32"):
  """Eval-mode (outputs [M, ...], embeddings [M, D]) as NumPy over fixed-size batches.

  With `with_losses` (a state holding a LossNet), also the predicted losses [M], from the
  same pass.
  """
  _check_hashable(model)
  mesh = parallel.make_mesh() if mesh is None else mesh
  model = bind_platform(model, mesh)
  images = _host_rows(images)
  check_inputs(images, None, None, batch_size, mesh, need_targets=False)
  indices = (np.arange(images.shape[0]) if indices is None
             else np.asarray(indices, dtype=np.int64).reshape(-1))
  if indices.size and (indices.min() < -images.shape[0] or indices.max() >= images.shape[0]):
    raise ValueError(f"indices out of range for {images.shape[0]} images.")
  loss_net = state.loss_net if with_losses else None
  fn = _forward_fn(model, augment.as_spec(preprocessing), mesh, loss_net,
                   precision.check_compute_dtype(compute_dtype))
  variables = {"learner": _variables(state)}
  if loss_net is not None:
    variables["loss_net"] = state.loss_net_params
  results, pending = [], collections.deque()
  for start in range(0, indices.size, batch_size):
    chunk = indices[start:start + batch_size]
    # Fixed batch shape (one compile for any count): pad with copies of the first index.
    padded = np.concatenate([chunk, np.full(batch_size - chunk.size, chunk[0])])
    pending.append((chunk.size, fn(variables, parallel.shard_batch(mesh, images[padded]))))
    # Dispatch is asynchronous: without a bound, every batch's input could be queued at once.
    if len(pending) > _IN_FLIGHT:
      results.append(_fetch(*pending.popleft()))
  results.extend(_fetch(*batch) for batch in pending)
  if not results:
    shapes = jax.eval_shape(
        fn, variables, jax.ShapeDtypeStruct((batch_size,) + images.shape[1:], images.dtype))
    return tuple(np.zeros((0,) + s.shape[1:], np.float32) for s in shapes)
  return tuple(np.concatenate([rows[k] for rows in results]) for k in range(len(results[0])))


def _fetch(count, arrays):
  """The first `count` rows of a batch's outputs, on the host (waits for the batch)."""
  return tuple(parallel.to_host(array)[:count] for array in arrays)


def forward_outputs(state: TrainState, model, images, indices=None, *, batch_size: int,
                    preprocessing, mesh, with_losses: bool = False,
                    compute_dtype: str = "float32"):
  """The eval-mode pass before any softmax: (outputs [M, ...] (logits), embeddings [M, D]) and,
  with `with_losses` (a state holding a LossNet), the predicted losses [M], as NumPy, over
  fixed-size batches of `images[indices]` (all images when None).

  The same pass as `forward_pool` (which applies the softmax to the whole [M, C] at once): a
  caller that streams a pool through it in pieces applies the softmax once at the end to get
  `forward_pool`'s probabilities bit for bit.
  """
  return _forward(state, model, images, indices, batch_size=batch_size,
                  preprocessing=preprocessing, mesh=mesh, with_losses=with_losses,
                  compute_dtype=compute_dtype)


def predict(state: TrainState, model, images, indices=None, *, batch_size: int = 256,
            preprocessing=None, mesh=None, compute_dtype: str = "float32") -> np.ndarray:
  """Eval-mode network outputs (no augmentation).

  Args:
    state: trained `TrainState`.
    model: the learner it belongs to.
    images: [N, H, W, C] raw images (host NumPy, or a `data.stream.RowView` whose rows are
      read batch by batch; multi-host: the full set in every process).
    indices: optional [M] ints into `images`; None = all N.
    batch_size: fixed device batch (multiple of the device count); one compile for any M.
    preprocessing: `PreprocessSpec`, dataset name or None.
    mesh: data mesh; None = all devices.
    compute_dtype: "float32" or "bfloat16" for the pass (outputs are float32 either way).
  Returns:
    [M, C] float32 NumPy logits (or [M, J*3] coordinates).
  """
  return _forward(state, model, images, indices, batch_size=batch_size,
                  preprocessing=preprocessing, mesh=mesh, compute_dtype=compute_dtype)[0]


def extract_embeddings(state: TrainState, model, images, indices=None, *,
                       batch_size: int = 256, preprocessing=None, mesh=None,
                       compute_dtype: str = "float32") -> np.ndarray:
  """Eval-mode learner embeddings (the features the samplers use; protocol §2).

  Args: as `predict`.
  Returns:
    [M, D] float32 NumPy array, row i for `images[indices[i]]`.
  """
  return _forward(state, model, images, indices, batch_size=batch_size,
                  preprocessing=preprocessing, mesh=mesh, compute_dtype=compute_dtype)[1]


def forward_pool(state: TrainState, model, images, indices=None, *, task: str = "classification",
                 batch_size: int = 256, preprocessing=None, mesh=None,
                 compute_dtype: str = "float32") -> dict:
  """What the samplers can read about some images, from one eval-mode pass.

  Args: as `predict`; `task` decides whether class probabilities exist.
  Returns:
    dict of NumPy arrays, row i for `images[indices[i]]`: "embedding" [M, D] float32, for
    classification "probabilities" [M, C] float32 (softmax of the logits), and when the state
    holds a LossNet (`fit(..., loss_prediction=...)`) "predicted_losses" [M] float32, computed
    from the stage outputs of the same pass.
  """
  check_task(task)
  with_losses = state.loss_net_params is not None
  outputs, embedding, *predicted = _forward(state, model, images, indices,
                                            batch_size=batch_size, preprocessing=preprocessing,
                                            mesh=mesh, with_losses=with_losses,
                                            compute_dtype=compute_dtype)
  result = {"embedding": embedding}
  if task == "classification":
    result["probabilities"] = np.asarray(jax.nn.softmax(outputs.astype(np.float32), axis=-1))
  if with_losses:
    result["predicted_losses"] = predicted[0].astype(np.float32)
  return result


def evaluate(state: TrainState, model, images, targets, *, task: str = "classification",
             batch_size: int = 256, preprocessing=None, mesh=None,
             compute_dtype: str = "float32") -> float:
  """Test metric in eval mode, no augmentation.

  Args:
    images: [N, H, W, C] raw images; targets: [N] int labels or [N, J*3] coordinates.
    task: "classification" -> accuracy in [0, 1]; "regression" -> mean joint error: the
      Euclidean distance per joint, averaged over joints and examples (targets' units).
    Others: as `predict`.
  Returns:
    Python float.
  """
  check_task(task)
  images, targets = _host_rows(images), np.asarray(targets)
  mesh = parallel.make_mesh() if mesh is None else mesh
  check_inputs(images, targets, task, batch_size, mesh)
  outputs = predict(state, model, images, batch_size=batch_size, preprocessing=preprocessing,
                    mesh=mesh, compute_dtype=compute_dtype)
  if task == "classification":
    return float(np.mean(np.argmax(outputs, axis=-1) == targets))
  diff = (outputs.astype(np.float64) - targets).reshape(len(targets), -1, 3)
  return float(np.mean(np.sqrt(np.sum(diff**2, axis=-1))))
