"""Reduces the reference implementation's outputs to the compact fixtures in this directory.

Usage: python tests/data/reduce_reference.py REFERENCE_DIR

REFERENCE_DIR holds the full outputs of the PyTorch reference (features.npy, adj.npy, ...; see
README.md here). Every array the tests need is kept losslessly in its original dtype, except:
  * features.npy is not stored: it is regenerated from its recipe (`reference_features`), and the
    tests check the result byte for byte against the SHA-256 recorded in features.json;
  * features_l2.npy is stored as its 3000 float32 row norms: features / norms equals the reference
    bit for bit (also checked by SHA-256);
  * adj.npy (3000 x 3000) is stored as a fixed sample of (row, col, value) entries and as its
    product with a fixed probe matrix.
The script checks each reduction before writing anything.
"""

import hashlib
import json
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
NUM_NODES = 3000
FEATURES_RECIPE = "np.abs(np.random.default_rng(0).standard_normal((3000, 512))).astype(np.float32)"
ADJ_RANDOM_ENTRIES = 50_000
ADJ_FULL_LINES = (0, 1, 1999, 2000, 2001, 2999)  # unlabelled and labelled, at both ends
SELECTIONS = ("kcenter_idx", "kcenter_raw_idx", "coregcn_idx", "uncertaingcn_idx",
              "uncertaingcn_argsort")
USED_GCN_WEIGHTS = ("gc1.weight", "gc1.bias", "gc3.weight", "gc3.bias")


def reference_features():
  return np.abs(np.random.default_rng(0).standard_normal((3000, 512))).astype(np.float32)


def adj_probe():
  """The [3000, 5] float32 matrix whose product with the adjacency is stored."""
  return np.random.default_rng(2).normal(size=(NUM_NODES, 5)).astype(np.float32)


def sha256(array):
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _row_norms(features, features_l2):
  """Float32 denominators d with features / d == features_l2 exactly (torch F.normalize)."""
  approx = np.linalg.norm(features.astype(np.float64), axis=1).astype(np.float32)
  norms = np.empty(len(features), np.float32)
  for i, start in enumerate(approx):
    candidates = [start]
    up = down = start
    for _ in range(8):  # the reference's float32 norm is within a few ulps of the exact one
      up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))
      candidates += [up, down]
    exact = [d for d in candidates if np.array_equal(features[i] / d, features_l2[i])]
    if not exact:
      raise ValueError(f"row {i}: no float32 norm reproduces features_l2 exactly")
    norms[i] = exact[0]
  return norms


def _adj_sample(adj):
  rng = np.random.default_rng(123)
  rows = [np.arange(NUM_NODES), rng.integers(0, NUM_NODES, ADJ_RANDOM_ENTRIES)]
  cols = [np.arange(NUM_NODES), rng.integers(0, NUM_NODES, ADJ_RANDOM_ENTRIES)]
  for line in ADJ_FULL_LINES:
    rows += [np.full(NUM_NODES, line), np.arange(NUM_NODES)]
    cols += [np.arange(NUM_NODES), np.full(NUM_NODES, line)]
  rows, cols = np.concatenate(rows).astype(np.int16), np.concatenate(cols).astype(np.int16)
  return dict(rows=rows, cols=cols, values=adj[rows, cols])


def main(reference_dir):
  ref = pathlib.Path(reference_dir)
  features = np.load(ref / "features.npy")
  features_l2 = np.load(ref / "features_l2.npy")
  if not np.array_equal(reference_features(), features):
    raise ValueError("features.npy is not " + FEATURES_RECIPE)
  norms = _row_norms(features, features_l2)
  assert np.array_equal(features / norms[:, None], features_l2)

  adj = np.load(ref / "adj.npy")
  probe = adj_probe()
  arrays = {
      "adj_sample.npz": dict(_adj_sample(adj), probe=probe,
                             adj_times_probe=adj.astype(np.float64) @ probe),
      "gcn_init.npz": {k: v for k, v in np.load(ref / "gcn_init.npz").items()
                       if k in USED_GCN_WEIGHTS},
      "gcn_grad0.npz": dict(np.load(ref / "gcn_grad0.npz")),
      "gcn_outputs_by_step.npz": dict(np.load(ref / "gcn_outputs_by_step.npz")),
      "gcn_embedding.npz": {"gcn_embedding": np.load(ref / "gcn_embedding.npy")},
      "selections.npz": {name: np.load(ref / (name + ".npy")) for name in SELECTIONS},
  }
  for name, content in arrays.items():
    np.savez_compressed(HERE / name, **content)
  for name in ("gcn_loss_all", "gcn_scores"):
    np.save(HERE / (name + ".npy"), np.load(ref / (name + ".npy")))
  np.save(HERE / "features_l2_norms.npy", norms)
  (HERE / "features.json").write_text(json.dumps({
      "features": {"recipe": FEATURES_RECIPE, "dtype": "float32", "shape": [3000, 512],
                   "sha256": sha256(features)},
      "features_l2": {"recipe": "features / features_l2_norms[:, None]", "dtype": "float32",
                      "shape": [3000, 512], "sha256": sha256(features_l2)},
  }, indent=1) + "\n")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  main(sys.argv[1])
