r"""The train step fed by the training input: what the input costs the step on this machine.

On a small CPU the input pipeline and the compiled step share the cores, so the step of the main
loop is slower than the same step run on one fixed batch. This benchmark builds the config's
train step once and times it, interleaved in one process, with medians over `--reps` rounds of
`--steps` steps:

  fixed batch             the same device batch every step: the step alone
  cache_train, read first the batch read and put on the devices, then the step dispatched: the
                          loop before it read ahead, with the tf.data augmentation of cached
                          images (`dataset.cache_train`), the baseline
  cache_train             the loop of `train.train_and_evaluate`: the next batch read and put
                          while the step runs
  cache_train_resized     the same loop with `dataset.cache_train_resized`: images resized once,
                          batches made in numpy

and prints ms per step and the speed of each against the baseline (>1: faster), then the CPU
time (all threads) of each input alone per batch. Both inputs need `dataset.augmentation`
"fixed" with one scale (the resized cache's condition), as configs/shapes.py has.

Command:
  PYTHONPATH=. python experiments/bench_feed.py --config configs/shapes.py
"""

import argparse
import os
import statistics
import time

import jax

from detr_jax import config_checks
from detr_jax import train
from detr_jax.data import input_pipeline


def _cpu_seconds():
  times = os.times()
  return times.user + times.system


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/shapes.py")
  parser.add_argument("--steps", type=int, default=300, help="timed steps per round and loop")
  parser.add_argument("--reps", type=int, default=3, help="rounds (medians)")
  parser.add_argument("--input_batches", type=int, default=500,
                      help="batches read from each input alone, for its CPU time")
  args = parser.parse_args()

  config = config_checks.load_config(args.config)
  config.dataset.cache_train = True
  config.dataset.cache_train_resized = False
  config = train.resolve_config(config, input_pipeline.dataset_info(config.dataset))
  config_checks.check_cache_train_resized(config.dataset)  # one fixed size, as it needs
  mesh = train.create_mesh()
  model, tx, _, _, step_fn = train.build_train_step(config, mesh,
                                                    train.total_train_steps(config))
  variables = train.init_variables(config, model, jax.random.PRNGKey(0))
  state = train.create_train_state(config, model, tx, mesh, jax.random.PRNGKey(1), variables)
  iterators = {}
  for resized in (False, True):
    config.dataset.cache_train_resized = resized
    iterators[resized] = input_pipeline.create_train_iterator(config)
  fixed = train.global_batch(next(iterators[False]), mesh)
  for _ in range(3):  # compile and warm up
    state, metrics = step_fn(state, fixed)
  jax.block_until_ready(metrics)

  def run(name, state):
    """state after args.steps steps of loop `name`, and the seconds they took."""
    start = time.perf_counter()
    if name == "fixed batch":
      for _ in range(args.steps):
        state, metrics = step_fn(state, fixed)
    elif name == "cache_train, read first":
      for _ in range(args.steps):
        state, metrics = step_fn(state, train.global_batch(next(iterators[False]), mesh))
    else:  # read ahead, as train.train_and_evaluate does
      it = iterators[name == "cache_train_resized"]
      batch = train.global_batch(next(it), mesh)
      for _ in range(args.steps):
        state, metrics = step_fn(state, batch)
        batch = train.global_batch(next(it), mesh)
    jax.block_until_ready(metrics)
    return state, time.perf_counter() - start

  names = ("cache_train, read first", "fixed batch", "cache_train", "cache_train_resized")
  seconds = {name: [] for name in names}
  for rep in range(args.reps):
    for name in names:
      state, elapsed = run(name, state)
      seconds[name].append(elapsed / args.steps)
    print(f"round {rep + 1}: " + ", ".join(f"{n} {seconds[n][-1] * 1e3:.1f} ms" for n in names),
          flush=True)
  base = statistics.median(seconds[names[0]])
  print(f"\n{args.config}, batch {config.batch_size}, {args.steps} steps x {args.reps} rounds "
        f"(medians), {jax.device_count()} {jax.default_backend()} device(s)\n")
  print("| loop | ms per step | speed vs the baseline |")
  print("|---|---|---|")
  for name in names:
    median = statistics.median(seconds[name])
    label = name + (" (baseline)" if name == names[0] else "")
    print(f"| {label} | {median * 1e3:.1f} | {base / median:.2f}x |")

  print("\n| input alone | CPU ms per batch (all threads) | wall ms per batch |")
  print("|---|---|---|")
  for resized, name in ((False, "cache_train"), (True, "cache_train_resized")):
    it = iterators[resized]
    cpu, wall = _cpu_seconds(), time.perf_counter()
    for _ in range(args.input_batches):
      next(it)
    cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
    print(f"| {name} | {cpu / args.input_batches * 1e3:.2f} | "
          f"{wall / args.input_batches * 1e3:.2f} |")


if __name__ == "__main__":
  main()
