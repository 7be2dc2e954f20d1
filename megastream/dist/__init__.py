"""Data parallel over torch.distributed (`torchrun`), with the host state sharded across the ranks
of a node and replicated across nodes (HSDP).

    comm.py       the process group, its node / replica groups, the collectives (a shim over the
                  torch 2.11-2.13 names), agreement on errors and config
    shard.py      ShardedStore: this rank's 1/n of every unit, in every host arena
    streaming.py  weights: H2D of the shard + all-gather; gradients: reduce-scatter + D2H of the shard
    state.py      saving: rank 0 writes, gathering unit by unit; optimizer shards + a manifest
    cost.py       the communication terms of `plan` for n ranks per node and m nodes
"""
