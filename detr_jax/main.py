r"""Command line entry point: trains and evaluates DETR.

  python -m detr_jax.main --config configs/shapes.py --workdir /tmp/detr_shapes \
      --config.num_train_steps=100

Any config field can be overridden with `--config.field=value`.

Multi-host (every process runs the same command): add `--distributed`. On Cloud TPU pods JAX finds
the cluster itself; elsewhere also pass `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from detr_jax import cli
from detr_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=False)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host).")
flags.DEFINE_string("coordinator_address", None, "With --distributed: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "With --distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info("JAX process %d/%d, local devices %s.", jax.process_index(), jax.process_count(),
               jax.local_devices())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)
