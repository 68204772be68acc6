"""Parallel kernels: the parts of the model XLA cannot infer from shardings alone, written with shard_map."""
