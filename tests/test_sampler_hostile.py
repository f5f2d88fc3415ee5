"""The samplers against hostile input (issue 21, library part): one clear ValueError, or the
same picks as the sane input they stand for.

Each test is one case of the issue: low-precision features (float16, bfloat16), bools where
numbers are meant, object-dtype pool fields, float64 values beyond float32 range, and absurd
option values refused by the registry's own checks (so the library, experiments/main.py and
`jax-seqgcn select` refuse them alike). Small synthetic pools; GCN training kept short.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_seqgcn as jsg
from jax_seqgcn import samplers
from jax_seqgcn.experiment import loop
from tests.conftest import tiny_config

N, NUM_LABELLED, DIM, BUDGET = 48, 12, 6, 4
FAST_GCN = dict(steps=10, hidden=16)
# The samplers that read pool.features, with short settings (VAAL reads images: below).
FEATURE_SAMPLERS = {"UncertainGCN": FAST_GCN, "CoreGCN": FAST_GCN,
                    "UncertainDiscriminator": FAST_GCN, "CoreSet": {}, "FeatProp": {},
                    "BADGE": {}}


def problem(seed=0):
  """features [N, DIM] float64 (>= 0, so no degenerate graph), mask [N], probabilities [N, 3]."""
  rng = np.random.default_rng(seed)
  features = np.abs(rng.normal(size=(N, DIM))) + 0.1
  mask = np.zeros(N, bool)
  mask[rng.choice(N, NUM_LABELLED, replace=False)] = True
  logits = rng.normal(size=(N, 3))
  probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  return features, mask, probabilities


def pick(name, pool, budget=BUDGET, **options):
  return np.asarray(samplers.get_sampler(name)(jax.random.key(0), pool, budget, **options))


def no_warnings(fn):
  """fn() with every warning an error (a cast that overflows warns before our check)."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    return fn()


# Case 1: float16 / bfloat16 features are computed in float32: the same picks as their cast.


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", list(FEATURE_SAMPLERS))
def test_low_precision_features_pick_as_their_float32_cast(name, dtype):
  features, mask, probabilities = problem()
  low = features.astype(dtype)
  extra = {"probabilities": probabilities} if name == "BADGE" else {}
  picks = no_warnings(lambda: pick(name, samplers.Pool(mask, features=low, **extra),
                                   **FEATURE_SAMPLERS[name]))
  expected = pick(name, samplers.Pool(mask, features=low.astype(np.float32), **extra),
                  **FEATURE_SAMPLERS[name])
  np.testing.assert_array_equal(picks, expected)


def test_low_precision_features_pick_as_their_cast_in_the_plain_functions():
  features, mask, _ = problem()
  low = jnp.asarray(features, jnp.float16)  # on the device already
  for fn in (jsg.samplers.uncertain_gcn, jsg.samplers.core_gcn):
    np.testing.assert_array_equal(
        fn(jax.random.key(0), low, mask, BUDGET, **FAST_GCN),
        fn(jax.random.key(0), low.astype(jnp.float32), mask, BUDGET, **FAST_GCN))


def test_checked_features_are_float32():
  features, _, _ = problem()
  for dtype in (np.float16, jnp.bfloat16, np.int32, bool):
    checked = no_warnings(lambda: jsg.checks.features(features.astype(dtype)))
    assert checked.dtype == jnp.float32


# Case 2: bools are not numbers here: a budget of True is not 1.


@pytest.mark.parametrize("budget", [True, np.bool_(True)])
def test_bool_budget_is_refused(budget):
  features, mask, _ = problem()
  for name, pool in (("Random", samplers.Pool(mask)),
                     ("CoreSet", samplers.Pool(mask, features=features))):
    with pytest.raises(ValueError, match="budget must be a positive int"):
      pick(name, pool, budget)
  with pytest.raises(ValueError, match="budget must be a positive int"):
    jsg.samplers.uncertain_gcn_select(np.full(N, 0.5, np.float32), mask, True)


@pytest.mark.parametrize("name, option, value", [
    ("UncertainGCN", "s_margin", True),
    ("UncertainGCN", "s_margin", False),
    ("UncertainDiscriminator", "s_margin", np.bool_(True)),
    ("CoreGCN", "steps", True),
    ("CoreGCN", "hidden", True),
    ("CoreGCN", "dropout_rate", False),
    ("CoreGCN", "learning_rate", True),
    ("FeatProp", "featprop_hops", True),
    ("VAAL", "vaal_batch_size", True),
    ("VAAL", "vaal_epochs", True),
])
def test_bool_options_are_refused(name, option, value):
  with pytest.raises(ValueError, match=f"{option} must be"):
    samplers.get_sampler(name).resolve_options({option: value})


def test_real_s_margin_values_pass():
  sampler = samplers.get_sampler("UncertainGCN")
  for value in (0, 1, 0.25, np.float32(0.5), np.int64(1)):
    assert sampler.resolve_options({"s_margin": value})["s_margin"] == value
  with pytest.raises(ValueError, match="s_margin must be"):
    sampler.resolve_options({"s_margin": float("nan")})


# Case 3: an object-dtype pool field is one ValueError naming the field and its dtype.


@pytest.mark.parametrize("field, name", [
    ("features", "CoreSet"),
    ("features", "Random"),  # not needed, still checked
    ("probabilities", "Entropy"),
    ("probabilities", "BADGE"),
    ("predicted_losses", "LearningLoss"),
    ("labelled_mask", "Random"),
])
def test_object_dtype_pool_field_is_refused(field, name):
  features, mask, probabilities = problem()
  fields = dict(labelled_mask=mask, features=features, probabilities=probabilities,
                predicted_losses=np.linspace(0.0, 1.0, N))
  fields[field] = np.array(fields[field].tolist(), dtype=object)
  with pytest.raises(ValueError, match=rf"{field} must hold real numbers .*got dtype object"):
    pick(name, samplers.Pool(**fields))


def test_object_dtype_features_refused_by_the_plain_functions():
  features, mask, _ = problem()
  features = np.array(features.tolist(), dtype=object)
  with pytest.raises(ValueError, match="features must hold real numbers .*got dtype object"):
    jsg.samplers.coreset(jax.random.key(0), features, mask, BUDGET)
  with pytest.raises(ValueError, match="features must hold real numbers .*got dtype object"):
    jsg.checks.features(features)


def test_string_and_complex_features_are_refused():
  features, mask, _ = problem()
  for bad in (features.astype(str), features.astype(np.complex64)):
    with pytest.raises(ValueError, match=f"features must hold real numbers .*{bad.dtype}"):
      pick("CoreSet", samplers.Pool(mask, features=bad))


# Case 4: a float64 value beyond float32 range is named as such, with no overflow warning.


@pytest.mark.parametrize("field, name", [
    ("features", "CoreSet"),
    ("features", "UncertainGCN"),
    ("probabilities", "Entropy"),
    ("predicted_losses", "LearningLoss"),
])
@pytest.mark.parametrize("value", [1e300, -1e39])
def test_values_beyond_float32_range_are_named(field, name, value):
  features, mask, probabilities = problem()
  fields = dict(features=features, probabilities=probabilities,
                predicted_losses=np.linspace(0.0, 1.0, N))
  fields[field] = fields[field].copy()
  fields[field][5] = value
  with pytest.raises(ValueError, match=rf"{field} has values beyond float32 range \(max "
                                       r"3\.4e38\) in 1 row\(s\), first at rows \[5\]"):
    no_warnings(lambda: pick(name, samplers.Pool(mask, **fields), **(
        FAST_GCN if "GCN" in name else {})))


def test_nan_and_inf_are_still_reported_as_such():
  features, mask, probabilities = problem()
  features[7, 0] = np.inf
  with pytest.raises(ValueError, match=r"features has NaN or inf in 1 row\(s\), first at "
                                       r"rows \[7\]"):
    no_warnings(lambda: pick("CoreSet", samplers.Pool(mask, features=features)))
  probabilities[2, 1] = np.nan
  with pytest.raises(ValueError, match="pool.probabilities has NaN or inf"):
    no_warnings(lambda: pick("Entropy", samplers.Pool(mask, probabilities=probabilities)))


def test_float64_within_float32_range_passes():
  features, mask, _ = problem()
  features[5] *= 1e37  # large, but a float32 holds it
  picks = no_warnings(lambda: pick("CoreSet", samplers.Pool(mask, features=features)))
  assert picks.shape == (BUDGET,) and not mask[picks].any()


# Case 5: absurd option values are refused by the registry's own checks, saying why.


@pytest.mark.parametrize("name, option, value, message", [
    ("CoreGCN", "steps", 10 ** 9, "steps must be <= 1000000"),
    ("UncertainGCN", "hidden", 10 ** 7, "hidden must be <= 65536"),
    ("UncertainDiscriminator", "steps", 10 ** 6 + 1, "steps must be <= 1000000"),
    ("VAAL", "vaal_epochs", 1e9, "vaal_epochs must be <= 10000"),
    ("VAAL", "vaal_width", 100.0, "vaal_width must be <= 8"),
    ("VAAL", "vaal_batch_size", 10 ** 6, "vaal_batch_size must be <= 65536"),
    ("VAAL", "vaal_latent_dim", 10 ** 6, "vaal_latent_dim must be <= 65536"),
])
def test_absurd_options_are_refused_by_the_registry(name, option, value, message):
  sampler = samplers.get_sampler(name)
  with pytest.raises(ValueError, match=f"{message}, got {value!r}: "):
    sampler.resolve_options({option: value})
  # The sampler call itself refuses them too, before any work.
  features, mask, _ = problem()
  with pytest.raises(ValueError, match=message):
    sampler(jax.random.key(0), samplers.Pool(mask, features=features), BUDGET,
            **{option: value})


def test_absurd_gcn_options_are_refused_by_train_gcn():
  features, mask, _ = problem()
  # NaN features too: the options are refused first, before the inputs are looked at.
  features[0, 0] = np.nan
  with pytest.raises(ValueError, match="steps must be <= 1000000"):
    jsg.selection.train_gcn(jax.random.key(0), features, mask, steps=10 ** 7)
  with pytest.raises(ValueError, match="hidden must be <= 65536"):
    jsg.samplers.core_gcn(jax.random.key(0), features, mask, BUDGET, hidden=65537)


def test_option_bounds_themselves_pass():
  samplers.get_sampler("CoreGCN").resolve_options({"hidden": 65536, "steps": 10 ** 6})
  samplers.get_sampler("VAAL").resolve_options(dict(
      vaal_epochs=10 ** 4, vaal_width=8, vaal_batch_size=65536, vaal_latent_dim=65536))


@pytest.mark.parametrize("sampler, option, value, message", [
    ("CoreGCN", "steps", 10 ** 9, "steps must be <= 1000000"),
    ("VAAL", "vaal_width", 100.0, "vaal_width must be <= 8"),
])
def test_experiment_config_refuses_absurd_options(sampler, option, value, message):
  # What experiments/main.py checks before any training (`loop.validate_config`).
  config = tiny_config(sampler__name=sampler, **{f"sampler__{option}": value})
  with pytest.raises(loop.ConfigError, match=f"sampler {sampler}: .*{message}"):
    loop.validate_config(config)
