"""Active learning samplers: one signature, one registry (`SAMPLERS`, `get_sampler`).

`get_sampler(name)(key, Pool(labelled_mask, features=...), budget, **options)` returns `budget`
distinct unlabelled node indices; see `base` for the `Pool` fields and how each sampler declares
what it needs. One module per family:

* `basic`: Random, CoreSet.
* `gcn`: UncertainGCN, CoreGCN, UncertainDiscriminator (and the GCN ablations as options).
* `vaal`: VAAL (beta-VAE + latent discriminator on the pool's images).
* `learning_loss`: LearningLoss (predicted losses of a LossNet trained with the learner).
* `featprop`: FeatProp (k-medoids of the unlabelled nodes on graph-propagated features).
* `uncertainty`: Entropy, Margin, LeastConfidence on the learner's class probabilities.
* `badge`: BADGE, k-means++ seeding on last-layer gradient embeddings (features + probabilities);
  `badge_sharded`: its seeding split over a device mesh.
* `power`: PowerEntropy, draws proportional to entropy^beta (`power_sample` for any score).
* `typiclust`: TypiClust (TPC-RP), the most typical node of the least-labelled k-means clusters.
* `probcover`: ProbCover, greedy max coverage of delta-balls on unit embeddings.
* `cluster_margin`: ClusterMargin, round robin over HAC clusters of the smallest-margin nodes.
* `bald`: BALD and PowerBALD on T MC-dropout predictions (`pool.mc_probabilities`).

The functions `random`, `coreset`, `uncertain_gcn`, `core_gcn`, `uncertain_discriminator` take a
features array directly: `(key, features, labelled_mask, budget, **options)`; `entropy`, `margin`,
`least_confidence` take `(key, probabilities, labelled_mask, budget)`, and `badge.badge` (not
re-exported: the name is the module's) takes `(key, features, probabilities, labelled_mask,
budget)`. `power_entropy` takes `(key, probabilities, labelled_mask, budget, **options)`;
`typiclust.typiclust` and `probcover.probcover` `(key, features, labelled_mask, budget,
**options)`, `cluster_margin.cluster_margin` `(key, features, probabilities, labelled_mask,
budget, **options)` (not re-exported: their names are their modules').
"""

from jax_seqgcn.samplers import base
from jax_seqgcn.samplers import basic
from jax_seqgcn.samplers import gcn
from jax_seqgcn.samplers import vaal
from jax_seqgcn.samplers import learning_loss
from jax_seqgcn.samplers import featprop
from jax_seqgcn.samplers import uncertainty
from jax_seqgcn.samplers import badge  # pylint: disable=g-bad-import-order (registry order)
from jax_seqgcn.samplers import power
from jax_seqgcn.samplers import typiclust
from jax_seqgcn.samplers import probcover
from jax_seqgcn.samplers import cluster_margin
from jax_seqgcn.samplers import bald
from jax_seqgcn.samplers.base import POOL_FIELDS
from jax_seqgcn.samplers.base import SAMPLERS
from jax_seqgcn.samplers.base import Pool
from jax_seqgcn.samplers.base import Sampler
from jax_seqgcn.samplers.base import all_options
from jax_seqgcn.samplers.base import current_mesh
from jax_seqgcn.samplers.base import get_sampler
from jax_seqgcn.samplers.base import on_mesh
from jax_seqgcn.samplers.basic import coreset
from jax_seqgcn.samplers.basic import random
from jax_seqgcn.samplers.gcn import core_gcn
from jax_seqgcn.samplers.gcn import core_gcn_select
from jax_seqgcn.samplers.gcn import uncertain_discriminator
from jax_seqgcn.samplers.gcn import uncertain_gcn
from jax_seqgcn.samplers.gcn import uncertain_gcn_select
from jax_seqgcn.samplers.power import power_entropy
from jax_seqgcn.samplers.power import power_sample
from jax_seqgcn.samplers.uncertainty import confidence_scores
from jax_seqgcn.samplers.uncertainty import entropy
from jax_seqgcn.samplers.uncertainty import entropy_scores
from jax_seqgcn.samplers.uncertainty import least_confidence
from jax_seqgcn.samplers.uncertainty import margin
from jax_seqgcn.samplers.uncertainty import margin_scores
