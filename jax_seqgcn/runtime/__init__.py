"""Process set-up for the entry points only (`experiments/main.py`, `jax-seqgcn`).

* `host_memory`: restart once with glibc huge pages for the learner's buffers.
* `compilation_cache`: the persistent XLA compilation cache.
"""
