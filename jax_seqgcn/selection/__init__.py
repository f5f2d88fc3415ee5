"""Selection algorithms, pure and jitted: the graph and its GCN, k-center, k-medoids.

* `graph`: the reference's adjacency (dense, or factored in linear memory), `propagate`, the
  `GCN` and its loss, `train_gcn`.
* `kcenter`: k-center greedy in exact float32 distances; `kcenter_sharded` over a device mesh.
* `kmedoids`: k-medoids (BUILD + SWAP) in blocks, for FeatProp.

Nothing here knows about learners, configs or files; the samplers (`jax_seqgcn.samplers`) call
these on a `Pool`.
"""

from jax_seqgcn.selection.graph import FactoredAdjacency
from jax_seqgcn.selection.graph import GCN
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
