"""Tensor parallelism across a LAN, applied to the model from outside.

`plan` decides which rows and columns of every weight each node holds (and which nodes take
part), `shard` is the weight store over one node's slices (resident, or streamed from a shard
file under a memory budget), `keys` the node identities and TLS contexts, `wire` the framed
transport over TLS and `messages` what travels on it, `replica` finds or keeps model files by
hash, `worker` serves a shard, `coordinator` is the Model stand-in that runs one shard and drives
the rest. The architecture files
know only `Model.reduce`, which the cluster replaces with its all-reduce.
"""
from .coordinator import ClusterModel
from .keys import Identity, keygen, load_identity
from .wire import DEFAULT_PORT, ClusterError, parse_address
from .worker import Worker, parse_size

__all__ = ["ClusterError", "ClusterModel", "DEFAULT_PORT", "Identity", "Worker", "keygen", "load_identity", "parse_address", "parse_size"]
