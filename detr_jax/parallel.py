"""The device mesh and moving batches onto it and back: shared by train, evaluate and predict.

Data parallelism is a 1-D mesh with axis "data" over every device of every host; batches are
sharded on their leading axis with `NamedSharding(mesh, P("data"))`, variables replicated.
"""

from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

AXIS = "data"


def create_mesh(devices=None) -> jax.sharding.Mesh:
  """1-D mesh "data" over `devices` (default: every device of every host).

  Auto axis types: the model code is written for replicated-or-batch shardings chosen by jit,
  not for explicit sharding in types.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_sizes(config: ml_collections.ConfigDict, mesh) -> None:
  n = mesh.devices.size
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % n:
      raise ValueError(f"config.{name}={config[name]} must be a multiple of the {n} devices.")


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Assembles the processes' local numpy batches into global jax.Arrays sharded on "data".

  The global batch is the local batch times the process count.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def to_host(x: jax.Array, mesh) -> np.ndarray:
  """This process's rows of a batch-sharded global array, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, P(AXIS)))
