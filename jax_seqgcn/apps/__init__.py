"""Applications on top of the experiment layer.

* `cli`: the `jax-seqgcn` command line (`select`, `tsne`).
* `own_data`: one selection round on a user's features or image folder.
* `tsne`: t-SNE figures of saved selections (scikit-learn and matplotlib when drawing).
"""
