"""The experiment layer: one I/O-free cycle and the checkpointed trials x cycles loop.

* `cycle`: train -> test -> pool -> select as pure steps (`make_setup`, `run_cycle`).
* `config`: every config field checked before any work; the config -> `fit` and sampler arguments.
* `loop`: `run(config, workdir)`: the workdir, checkpoints and resume.
* `workdir`: locking, `config.json`, the orbax checkpoint store.
* `results`: records, markdown tables and learning curves.
* `embeddings`: what the sampler saw, saved per selection (`config.al.save_embeddings`).
* `metrics`: TensorBoard event files and metrics.jsonl of a run (per epoch, sampler stage, cycle).

Import the modules themselves (`from jax_seqgcn.experiment import loop`); this package imports
nothing, so `cycle` does not load orbax or ml_collections.
"""
