"""moe_adapt.train: generic training pieces (workdir, checkpoints, metrics, loop, mesh)."""

from moe_adapt.train.checkpoint import Checkpointer, CheckpointRestoreError
from moe_adapt.train.loop import TrainingDivergedError, train_loop
from moe_adapt.train.mesh import (
  data_sharding,
  initialize_distributed,
  make_mesh,
  replicate,
  replicated,
  shard_batch,
)
from moe_adapt.train.metrics import MetricWriter, read_metrics
from moe_adapt.train.workdir import (
  ConfigMismatchError,
  WorkdirError,
  flatten_dict,
  prepare_workdir,
  read_results,
  write_json_atomic,
)

__all__ = [
  "CheckpointRestoreError",
  "Checkpointer",
  "ConfigMismatchError",
  "MetricWriter",
  "TrainingDivergedError",
  "WorkdirError",
  "data_sharding",
  "flatten_dict",
  "initialize_distributed",
  "make_mesh",
  "prepare_workdir",
  "read_metrics",
  "read_results",
  "replicate",
  "replicated",
  "shard_batch",
  "train_loop",
  "write_json_atomic",
]
