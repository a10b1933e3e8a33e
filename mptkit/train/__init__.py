"""Training: typed run config, optimizers and schedules, FSDP2, DCP checkpoints, the loop.

Imported only by `mptkit train` / `mptkit export` (and tests), never by `import mptkit`.
"""
