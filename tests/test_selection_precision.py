"""Every matrix product of the selection stage asks for full float32 (Precision.HIGHEST).

On TPU a float32 product at the default precision runs as bfloat16 passes and on Ampere+ GPUs as
TF32, so picks that match the reference on CPU would not match there (issue 19). Each test runs
a public entry point on small inputs with `jax_dump_ir_to` set, after `jax.clear_caches()`, so
every program it compiles (jitted functions, nested jits, eager ops) is lowered again and its
StableHLO written out; then every `stablehlo.dot_general` / `stablehlo.dot` in those modules must
carry `precision = [HIGHEST, HIGHEST]`. The learner's training is not covered: it keeps the
backend default (tests/test_precision.py covers its compute dtype).
"""

import contextlib
import pathlib
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_seqgcn
from jax_seqgcn import samplers
from jax_seqgcn.samplers import badge
from jax_seqgcn.samplers import badge_sharded
from jax_seqgcn.samplers import featprop
from jax_seqgcn.samplers import probcover
from jax_seqgcn.samplers import typiclust
from jax_seqgcn.selection import graph
from jax_seqgcn.selection import coverage
from jax_seqgcn.selection import kmeans
from jax_seqgcn.selection import kmedoids

N, DIM, CLASSES = 48, 6, 3
# Tiny GCNs: the precision of a program does not depend on its size.
GCN_OPTIONS = dict(steps=2, hidden=8)
# VAAL's VAE and discriminator are networks trained on images, like the learner: they keep the
# backend default (samplers/vaal.py); its pick (`top_unlabelled` on the logits) has no product.
LEARNER_LIKE = {"VAAL"}
# The registered samplers that do matrix products, each checked below together with the public
# functions that share its programs (one capture compiles each program once: the GCN's training
# is the slow part). Every other registered sampler, new ones included, is checked on its own.
WITH_PRODUCTS = {"CoreSet", "UncertainGCN", "CoreGCN", "UncertainDiscriminator", "FeatProp",
                 "BADGE", "TypiClust", "ProbCover"}

_DOT = re.compile(r"stablehlo\.dot(_general)?\b")
_HIGHEST = ("precision = [HIGHEST, HIGHEST]",
            "precision_config = [#stablehlo<precision HIGHEST>, #stablehlo<precision HIGHEST>]")
_LOC_USE = re.compile(r"loc\((#loc\d+)\)\s*$")
_LOC_DEF = re.compile(r"^(#loc\d+) = (.*)$")
_FILE_LINE = re.compile(r'"([^"]+\.py)":(\d+)')


def _source(text, line):
  """The first Python file:line in the debug location of an op line, for failure messages."""
  defs = dict(m.groups() for m in map(_LOC_DEF.match, text.splitlines()) if m)
  todo, seen = [m.group(1) for m in [_LOC_USE.search(line)] if m], set()
  while todo:
    loc = todo.pop(0)
    if loc in seen or loc not in defs:
      continue
    seen.add(loc)
    found = _FILE_LINE.search(defs[loc])
    if found and "site-packages" not in found.group(1):
      return f"{pathlib.Path(found.group(1)).name}:{found.group(2)}"
    todo.extend(re.findall(r"#loc\d+", defs[loc]))
  return "?"


@contextlib.contextmanager
def _dumped_programs():
  """Yields a list filled, on exit, with (module name, text) of every program lowered inside."""
  programs = []
  old = jax.config.read("jax_dump_ir_to")
  with tempfile.TemporaryDirectory() as directory:
    jax.clear_caches()  # programs compiled by earlier tests must be lowered (and dumped) again
    jax.config.update("jax_dump_ir_to", directory)
    try:
      yield programs
    finally:
      jax.config.update("jax_dump_ir_to", old)
      programs.extend((p.name, p.read_text()) for p in sorted(pathlib.Path(directory).iterdir())
                      if p.suffix == ".mlir")


def _products(programs):
  """(module, source, op line, is HIGHEST) for every dot in the dumped programs."""
  found = []
  for name, text in programs:
    for line in text.splitlines():
      if _DOT.search(line):
        found.append((name, _source(text, line), line.strip()[:160],
                      any(h in line for h in _HIGHEST)))
  return found


def assert_all_highest(fn, *, expect_products=True):
  """Runs `fn()` and checks every matrix product it compiled asks for HIGHEST precision."""
  with _dumped_programs() as programs:
    jax.block_until_ready(fn())
  assert programs, "jax_dump_ir_to wrote nothing: the check would be vacuous"
  products = _products(programs)
  if expect_products:
    assert products, "no matrix product was compiled: the check would be vacuous"
  bad = [f"{source} ({name}): {line}" for name, source, line, ok in products if not ok]
  assert not bad, (f"{len(bad)} of {len(products)} matrix products are not HIGHEST "
                   "precision:\n" + "\n".join(bad))
  return len(products)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  # Non-negative, as learner embeddings after a ReLU: every column sum of S - I is positive.
  features = np.abs(rng.normal(size=(N, DIM))).astype(np.float32)
  labelled = np.zeros(N, bool)
  labelled[rng.choice(N, 10, replace=False)] = True
  probabilities = rng.dirichlet(np.ones(CLASSES), N).astype(np.float32)
  return features, labelled, probabilities


def _registered(name, features, labelled, probabilities=None, **options):
  pool = jax_seqgcn.Pool(labelled, features=features, probabilities=probabilities)
  return jax_seqgcn.get_sampler(name)(jax.random.key(0), pool, 5, **options)


def test_the_check_catches_a_default_precision_product():
  x = jnp.ones((4, 3))
  with pytest.raises(AssertionError, match="1 of 1 matrix products are not HIGHEST"):
    assert_all_highest(lambda: jax.jit(lambda a: a @ a.T)(x))
  assert assert_all_highest(
      lambda: jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)) == 1


def test_a_callers_default_precision_does_not_lower_it():
  # Explicit per-op precision wins over `jax.default_matmul_precision` (part of the jit key).
  features, labelled, _ = _inputs()
  with jax.default_matmul_precision("bfloat16"):
    assert_all_highest(lambda: (
        jax_seqgcn.k_center_greedy(features, labelled, 5),
        jax_seqgcn.propagate(jax_seqgcn.factored_adjacency(features), features)))


def test_samplers_with_products_are_registered():
  assert LEARNER_LIKE | WITH_PRODUCTS <= set(samplers.SAMPLERS)


@pytest.mark.parametrize("name", sorted(set(samplers.SAMPLERS) - LEARNER_LIKE - WITH_PRODUCTS))
def test_other_registered_samplers(name):
  features, labelled, probabilities = _inputs()
  pool = jax_seqgcn.Pool(labelled, features=features, probabilities=probabilities,
                         predicted_losses=features[:, 0],
                         mc_probabilities=np.stack([probabilities, probabilities[::-1]]))
  assert_all_highest(lambda: jax_seqgcn.get_sampler(name)(jax.random.key(0), pool, 5),
                     expect_products=False)


def test_mc_dropout_predictions():
  # BALD's T passes feed the selection: their head products are HIGHEST too.
  features, _, _ = _inputs()
  head = {"kernel": np.ones((DIM, CLASSES), np.float32), "bias": np.zeros(CLASSES, np.float32)}
  assert assert_all_highest(lambda: jax_seqgcn.training.mc_dropout_probabilities(
      jax.random.key(0), head, features, 0.5, 3)) >= 1


def test_uncertain_gcn_and_core_gcn():
  # Registry, features-first functions, `train_gcn` and the two rules share one GCN program
  # ("auto" adjacency: factored here, 2 layers).
  features, labelled, _ = _inputs()

  def run():
    result = jax_seqgcn.train_gcn(jax.random.key(0), features, labelled, **GCN_OPTIONS)
    return (_registered("UncertainGCN", features, labelled, **GCN_OPTIONS),
            _registered("CoreGCN", features, labelled, **GCN_OPTIONS),
            samplers.uncertain_gcn(jax.random.key(0), features, labelled, 5, **GCN_OPTIONS),
            samplers.core_gcn(jax.random.key(0), features, labelled, 5, **GCN_OPTIONS),
            jax_seqgcn.uncertain_gcn_select(result.scores, labelled, 5),
            jax_seqgcn.core_gcn_select(result.embedding, labelled, 5))

  assert_all_highest(run)


def test_uncertain_discriminator():
  features, labelled, _ = _inputs()
  assert_all_highest(lambda: (
      _registered("UncertainDiscriminator", features, labelled, **GCN_OPTIONS),
      samplers.uncertain_discriminator(jax.random.key(0), features, labelled, 5, **GCN_OPTIONS),
      jax_seqgcn.train_gcn(jax.random.key(0), features, labelled, architecture="mlp",
                           **GCN_OPTIONS).scores))


# With the 2-layer factored GCN above: every layer count, adjacency and ablation code path.
@pytest.mark.parametrize("adjacency,num_layers", [("dense", 3), ("ones", 1)])
def test_train_gcn(adjacency, num_layers):
  features, labelled, _ = _inputs()
  assert_all_highest(lambda: jax_seqgcn.train_gcn(
      jax.random.key(0), features, labelled, adjacency=adjacency, num_layers=num_layers,
      **GCN_OPTIONS).embedding)


def test_graph_functions_and_modules():
  features, _, _ = _inputs()
  x = jnp.asarray(features[:, :2])

  def run():
    dense = jax_seqgcn.normalized_adjacency(features)
    factored = jax_seqgcn.factored_adjacency(features)
    model = jax_seqgcn.GCN(hidden=4)
    params = model.init(jax.random.key(0), features, factored, train=False)
    mlp = graph.MLPDiscriminator(hidden=4)
    mlp_params = mlp.init(jax.random.key(0), features, train=False)
    return (jax_seqgcn.propagate(dense, x), jax_seqgcn.propagate(factored, x),
            model.apply(params, features, dense, train=False),
            mlp.apply(mlp_params, features, train=False))

  assert_all_highest(run)


def test_k_center_and_coreset():
  features, labelled, _ = _inputs()
  cold = np.zeros_like(labelled)
  key = jax.random.key(1)
  assert_all_highest(lambda: (
      _registered("CoreSet", features, labelled),
      samplers.coreset(key, features, labelled, 5),
      samplers.coreset(key, features, cold, 5),
      jax_seqgcn.k_center_greedy(features, labelled, 5),
      jax_seqgcn.k_center_greedy(features, cold, 5, key=key)))
  assert_all_highest(lambda: (
      jax_seqgcn.k_center_greedy_sharded(features, labelled, 5),
      jax_seqgcn.k_center_greedy_sharded(features, cold, 5, key=key)))


def test_k_medoids_and_featprop():
  features, labelled, _ = _inputs()
  assert_all_highest(lambda: (
      _registered("FeatProp", features, labelled, featprop_max_sweeps=2),
      featprop.featprop(jax.random.key(0), features, labelled, 5, featprop_max_sweeps=2),
      featprop.propagate_features(features, hops=1),
      jax_seqgcn.k_medoids(jax.random.key(0), features, ~labelled, 5, max_sweeps=2).medoids,
      kmedoids.medoid_cost(features, ~labelled, jnp.arange(5))))
  mesh = jax.make_mesh((1,), ("data",))
  assert_all_highest(lambda: (
      featprop.propagate_features_sharded(features, 1, mesh),
      jax_seqgcn.k_medoids_sharded(jax.random.key(0), features, ~labelled, 5, mesh=mesh,
                                   max_sweeps=2).medoids))


def test_badge():
  features, labelled, probabilities = _inputs()
  factors = badge.gradient_factors(features, probabilities)
  assert_all_highest(lambda: (
      _registered("BADGE", features, labelled, probabilities),
      badge.badge(jax.random.key(0), features, probabilities, labelled, 5),
      badge.sq_distances_to(factors, 3)))
  assert_all_highest(lambda: badge_sharded.badge_sharded(
      jax.random.key(0), features, probabilities, labelled, 5, mesh=jax.make_mesh((1,), ("data",))))


def test_typiclust_and_k_means():
  features, labelled, _ = _inputs()
  assert_all_highest(lambda: (
      _registered("TypiClust", features, labelled, typiclust_iterations=2),
      typiclust.typiclust(jax.random.key(0), features, labelled, 5, typiclust_max_clusters=4),
      kmeans.k_means(jax.random.key(0), features, 3, iterations=2).centroids))


def test_probcover_and_ball_graph():
  features, labelled, _ = _inputs()
  assert_all_highest(lambda: (
      _registered("ProbCover", features, labelled),
      probcover.probcover(jax.random.key(0), features, labelled, 5, probcover_delta=0.3),
      coverage.ball_edges(features, 1.0, block=16).src))
