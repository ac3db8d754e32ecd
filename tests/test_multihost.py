"""Multi-host test: `python -m detr_jax.main --distributed` on two local processes.

Two processes with 2 CPU devices each (4 global devices) train and evaluate the tiny config
(configs/tiny_test.py), coordinated over 127.0.0.1 with gloo CPU collectives, and share one
workdir as the hosts of a pod share one GCS directory. The result is checked against an
independent single-process computation in the test process on 4 of its fake devices: the same
init, the same global batches (the two processes' input shards, asked for by process index) and
the same update step; the evaluation of the multi-host checkpoint there must give the COCO
metrics that the processes gathered from both hosts.
"""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny_test
from detr_jax import checkpointing
from detr_jax import evaluate
from detr_jax import train
from detr_jax.data import input_pipeline

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_SECONDS = 300
_FINAL_LOSS = re.compile(r"step (\d+)/(\d+)\s+loss (\S+)")
_EVALUATED = re.compile(r"Evaluated (\d+) images: (\{.*\})")
_THRESHOLD_REPORT = re.compile(r"At score >= \S+ \(the drawing threshold\): (\{.*\})")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, data_dir, log_dir):
  """Starts the processes of one distributed run; returns [(process, log path)]."""
  env = dict(os.environ)
  env.update({
      "JAX_PLATFORMS": "cpu",
      # Replaces the 8 fake devices of tests/conftest.py: 2 per process, 4 in all.
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
      "TF_CPP_MIN_LOG_LEVEL": "2",
      "CUDA_VISIBLE_DEVICES": "",
  })
  port = _free_port()
  runs = []
  for process_id in range(NUM_PROCESSES):
    command = [
        sys.executable, "-m", "detr_jax.main",
        f"--config={os.path.join(REPO_ROOT, 'configs', 'tiny_test.py')}",
        f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
        "--distributed", f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={NUM_PROCESSES}", f"--process_id={process_id}",
        "--alsologtostderr",
    ]
    log_path = os.path.join(log_dir, f"process_{process_id}.log")
    with open(log_path, "w") as log:
      process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    runs.append((process, log_path))
  return runs


def _wait(runs) -> list[str]:
  """Waits for every process; returns their logs; fails (killing the rest) on error/timeout."""
  failures = []
  for process, log_path in runs:
    try:
      process.wait(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
      failures.append(f"{log_path}: timed out after {TIMEOUT_SECONDS} s")
    if process.returncode not in (0, None):
      failures.append(f"{log_path}: exit code {process.returncode}")
  for process, _ in runs:
    if process.poll() is None:
      process.kill()
      process.wait()
  logs = []
  for _, log_path in runs:
    with open(log_path) as f:
      logs.append(f.read())
  if failures:
    tails = "\n".join(f"--- {path}\n{log[-3000:]}" for (_, path), log in zip(runs, logs))
    pytest.fail("Distributed run failed: " + "; ".join(failures) + "\n" + tails)
  return logs


def _reference_training(config, mesh):
  """Trains on one process with the global batches of the two-process run.

  Returns:
    (initial params, final TrainState, model, per-step losses).
  """
  total_steps = train.total_train_steps(config)
  model, tx, labels, schedules = train.build(config, mesh, total_steps)
  # Same key derivation as train.train_and_evaluate.
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = train.init_variables(config, model, init_rng)
  initial_params = jax.device_get(variables["params"])
  state = train.create_train_state(config, model, tx, mesh, state_rng, variables)
  step_fn = train.make_train_step(config, model, tx, labels, mesh, schedules)
  shards = [
      input_pipeline.create_train_iterator(config, start_step=0, process_index=p,
                                           process_count=NUM_PROCESSES)
      for p in range(NUM_PROCESSES)
  ]
  step_losses = []
  for _ in range(total_steps):
    # Process p's rows sit on its devices, which come p-th in the global device order.
    local = [next(shard) for shard in shards]
    batch = {k: np.concatenate([b[k] for b in local]) for k in train.TRAIN_KEYS}
    state, metrics = step_fn(state, train.global_batch(batch, mesh))
    step_losses.append(float(metrics["loss"]))
  return initial_params, state, model, step_losses


def _restore_multihost_state(workdir, reference_state, mesh):
  """Restores the run's latest checkpoint onto `mesh`, as a resuming run would."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), reference_state)
  manager = checkpointing.create_checkpoint_manager(workdir, read_only=True)
  try:
    return manager.latest_step(), checkpointing.restore(manager, abstract)
  finally:
    manager.close()


def _relative_distance(params, reference, initial) -> float:
  """|params - reference| / |reference - initial|, global L2 norms over the trees."""
  def norm(a, b):
    return np.sqrt(sum(
        np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
  return norm(params, reference) / norm(reference, initial)


def test_two_processes_match_one_process(tmp_path):
  num_devices = NUM_PROCESSES * DEVICES_PER_PROCESS
  assert len(jax.devices()) >= num_devices, "tests/conftest.py should give 8 fake devices"
  data_dir, workdir = tmp_path / "data", tmp_path / "workdir"
  config = tiny_test.get_config()
  config.dataset.data_dir = str(data_dir)
  # Prepare the dataset once, here: the processes would otherwise both build it at once.
  info = input_pipeline.dataset_info(config.dataset)
  config = train.resolve_config(config, info)
  total_steps = train.total_train_steps(config)

  runs = _launch(workdir, data_dir, tmp_path)
  try:
    mesh = train.create_mesh(jax.devices()[:num_devices])
    initial_params, reference_state, model, step_losses = _reference_training(config, mesh)
  finally:
    logs = _wait(runs)

  # Both processes trained the same replicated model: identical logged losses.
  final_losses = []
  for log in logs:
    assert f"Mesh: {num_devices} devices on {NUM_PROCESSES} processes." in log
    logged = {int(s): float(loss) for s, t, loss in _FINAL_LOSS.findall(log)
              if int(t) == total_steps}
    assert total_steps in logged, log[-3000:]
    final_losses.append(logged[total_steps])
  assert final_losses[0] == final_losses[1]
  # The loop logs the mean loss since the previous log line.
  log_every = int(config.log_every_steps)
  expected_loss = np.mean(step_losses[total_steps - log_every:total_steps])
  assert final_losses[0] == pytest.approx(expected_loss, abs=2e-4, rel=1e-4)

  # The shared workdir holds one checkpoint, equal to the single-process result.
  step, multihost_state = _restore_multihost_state(str(workdir), reference_state, mesh)
  assert step == total_steps
  assert int(multihost_state.step) == total_steps
  distance = _relative_distance(jax.device_get(multihost_state.params),
                                jax.device_get(reference_state.params), initial_params)
  assert distance < 1e-3, f"multi-host params differ from the reference by {distance:.3g}"

  # Every process gathered all eval images once and got the same metrics...
  with open(workdir / "eval_metrics.json") as f:
    written = json.load(f)
  assert written.pop("step") == total_steps
  for log in logs:
    evaluated = _EVALUATED.findall(log)
    assert evaluated, log[-3000:]
    num_images, logged_metrics = evaluated[-1]
    assert int(num_images) == info.num_eval_examples == config.dataset.num_eval_examples
    assert json.loads(logged_metrics) == {k: round(v, 4) for k, v in written.items()
                                          if k in evaluate.METRIC_NAMES}
    # The duplicate counts at the drawing threshold are logged on their own line.
    reports = _THRESHOLD_REPORT.findall(log)
    assert reports, log[-3000:]
    report = json.loads(reports[-1])
    assert {k: float(report[k]) for k in ("duplicates", "duplicate_images")} == {
        k: written[k] for k in ("duplicates", "duplicate_images")}
  # ...the metrics of a single-process evaluation of the same checkpoint.
  variables = {"params": multihost_state.params, "batch_stats": multihost_state.batch_stats}
  expected_metrics = evaluate.evaluate_coco(config, model, variables, mesh, info.class_names)
  assert written == pytest.approx(expected_metrics, abs=1e-4)
