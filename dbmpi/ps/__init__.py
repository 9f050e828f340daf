"""The sharded parameter server: shard store, control block, worker client, shard checkpoints."""
