"""Selection algorithms, pure and jitted: the graph and its GCN, k-center, k-medoids.

* `adjacency`: the reference's adjacency (dense, or factored in linear memory), `propagate`,
  and the "auto" choice between them.
* `graph`: `train_gcn`, the public entry of the GCN, re-exporting `gcn_model` (the `GCN`, its
  loss and dropout), `gcn_training` (training in compiled chunks on any graph), `gcn_fused` (the
  factored two-layer GCN with hand-written gradients in linear memory) and `gcn_sharded` (the
  same, the nodes split over a device mesh; `sharding` places rows on the mesh).
* `kcenter`: k-center greedy in exact float32 distances; `kcenter_sharded` over a device mesh.
* `kmedoids`: k-medoids (k-means++ seeding + FasterPAM swaps) in blocks, for FeatProp;
  `kmedoids_sharded` over a device mesh.
* `kmeans`: k-means (k-means++ seeding, Lloyd iterations) in O(N k) memory, for TypiClust.
* `coverage`: delta-ball graphs as edge lists and greedy max coverage, for ProbCover.

Nothing here knows about learners, configs or files; the samplers (`jax_seqgcn.samplers`) call
these on a `Pool`.

Precision: selection math runs at HIGHEST precision on every backend. Every matrix product here
and in the samplers' own selection code (BADGE) passes `precision=jax.lax.Precision.HIGHEST`
(`nn.Dense(precision=...)` in `graph.MLPDiscriminator`), so it holds whatever
`jax.default_matmul_precision` the caller sets and matches the CPU picks on TPU (whose float32
default is bfloat16 passes) and Ampere+ GPUs (TF32). The GCN's training is selection math too.
Learner training (`jax_seqgcn.training`, `jax_seqgcn.models`, VAAL's networks) uses the backend
default and `train.compute_dtype`. tests/test_selection_precision.py checks the lowered programs.
"""

from jax_seqgcn.selection.graph import FactoredAdjacency
from jax_seqgcn.selection.graph import GCN
from jax_seqgcn.selection.graph import GCN_CHUNK_STEPS
from jax_seqgcn.selection.graph import GCNResult
from jax_seqgcn.selection.graph import choose_adjacency
from jax_seqgcn.selection.graph import factored_adjacency
from jax_seqgcn.selection.graph import gcn_loss
from jax_seqgcn.selection.graph import gcn_loss_from_logits
from jax_seqgcn.selection.graph import normalized_adjacency
from jax_seqgcn.selection.graph import params_from_torch
from jax_seqgcn.selection.graph import propagate
from jax_seqgcn.selection.graph import train_gcn
from jax_seqgcn.selection.kcenter import k_center_greedy
from jax_seqgcn.selection.kcenter_sharded import k_center_greedy_sharded
from jax_seqgcn.selection.kmedoids import k_medoids
from jax_seqgcn.selection.kmedoids_sharded import k_medoids_sharded
from jax_seqgcn.selection.kmeans import k_means
from jax_seqgcn.selection.coverage import ball_edges
from jax_seqgcn.selection.coverage import greedy_max_coverage
