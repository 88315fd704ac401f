"""Sharding over a device mesh: tensor and data parallelism, multi-host.

`make_mesh(tp, dp)` builds the ("dp", "tp") mesh; `rules` maps param names to PartitionSpecs (and
duplicates kv heads when there are fewer than tp); `multihost` starts jax.distributed and carries
each step's batch from process 0 to the others.  See docs/sharding.md.
"""

from .mesh import AXES, make_mesh, replica_meshes
from .rules import (RULES, check_model, expand_kv, flatten, is_kv_proj, kv_cache_sharding, kv_replicas, make_put,
                    map_layers,
                    param_sharding, param_shardings, params_sharding_tree, partition_spec, put_array,
                    replicated, shard_attention, shard_decode_attention, shard_replicated, shard_params, sharded_model_config,
                    sharded_param_shapes, zeros, replica_params, vocab_sharding)

__all__ = ["AXES", "make_mesh", "replica_meshes", "RULES", "check_model", "expand_kv", "flatten", "is_kv_proj",
           "kv_cache_sharding", "kv_replicas", "make_put", "map_layers", "param_sharding", "param_shardings",
           "params_sharding_tree", "partition_spec", "put_array", "replicated", "shard_attention",
           "shard_decode_attention", "shard_replicated", "shard_params", "sharded_model_config", "sharded_param_shapes", "zeros", "replica_params", "vocab_sharding"]
