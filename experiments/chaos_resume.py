r"""Kill -9 at any moment loses nothing: a training run SIGKILLed again and again ends bit-equal.

Trains `configs/tiny_test.py` (with the matching inside the compiled step, so that every run
after the first loads its train step from JAX's persistent compilation cache, kept under the
root directory unless JAX_COMPILATION_CACHE_DIR is set) straight through with
`python -m detr_jax.main`, then trains it again in a fresh workdir, sending SIGKILL at random
moments and restarting the same command until it finishes. Every checkpoint step is saved
(`checkpoint_every_steps=1`, `keep_checkpoints=2`, so old checkpoints are being deleted as well),
so kills land while a step runs, while an asynchronous checkpoint is being written (the killer
watches for orbax's temporary step directory) and while the process starts or restores. It
checks:
  * the final train state (parameters, optimizer state, step, RNG) equals the straight run's, bit
    for bit;
  * every restart restored a checkpoint that was complete when the previous process was killed,
    never the partly written one.
It prints how many kills it survived, by kind, and exits non-zero on any difference.

Command:
  PYTHONPATH=. python experiments/chaos_resume.py --kills 12
"""

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESTORED = re.compile(r"Restoring checkpoint of step (\d+)")


def _command(workdir, data_dir, steps):
  # The matching runs inside the compiled step (exact, optax's Hungarian algorithm): a step
  # without a host callback can be stored in JAX's persistent compilation cache, so the lives
  # after the straight run load their train step instead of compiling it (about 10 s each).
  return [sys.executable, "-m", "detr_jax.main", "--config", os.path.join(REPO, "configs",
                                                                          "tiny_test.py"),
          f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
          f"--config.num_train_steps={steps}", "--config.checkpoint_every_steps=1",
          "--config.keep_checkpoints=2", "--config.eval_every_steps=-1",
          "--config.log_every_steps=1", "--config.loss.matcher=hungarian_device"]


def _env(root):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  if "JAX_COMPILATION_CACHE_DIR" not in env:  # one shared by every run of this benchmark
    env.update(JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _steps(checkpoints):
  """(complete steps, steps being written) in an orbax checkpoint directory."""
  try:
    names = os.listdir(checkpoints)
  except FileNotFoundError:
    return [], []
  done = sorted(int(n) for n in names if n.isdigit())
  writing = sorted(int(n.split(".")[0]) for n in names
                   if ".orbax-checkpoint-tmp" in n and n.split(".")[0].isdigit())
  return done, writing


def load_state(workdir):
  """The newest checkpoint of a workdir as a flat {path: numpy array} dict."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True)) as manager:
    step = manager.latest_step()
    state = manager.restore(step, args=ocp.args.StandardRestore())
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return step, {jax.tree_util.keystr(path): np.asarray(value) for path, value in flat}


def run_straight(workdir, data_dir, steps):
  start = time.monotonic()
  result = subprocess.run(_command(workdir, data_dir, steps), cwd=REPO,
                          env=_env(os.path.dirname(workdir)),
                          capture_output=True, text=True, check=False)
  if result.returncode:
    sys.exit(f"the straight run failed:\n{result.stderr[-4000:]}")
  return time.monotonic() - start


def run_with_kills(workdir, data_dir, steps, kills, rng, log):
  """Restarts the run until it finishes, SIGKILLing the first `kills` lives; returns the stats."""
  checkpoints = os.path.join(workdir, "checkpoints")
  stats = {"startup": 0, "running": 0, "during_write": 0, "restarts": 0}
  complete_after_kill = None
  startup_s = None  # launch to first new checkpoint, measured on the first life
  problems = []
  life = 0
  while True:
    life += 1
    before, _ = _steps(checkpoints)
    last = before[-1] if before else -1
    err_path = os.path.join(workdir, f"life_{life}.log")
    os.makedirs(workdir, exist_ok=True)
    with open(err_path, "w") as err:
      proc = subprocess.Popen(_command(workdir, data_dir, steps), cwd=REPO,
                              env=_env(os.path.dirname(workdir)),
                              stdout=subprocess.DEVNULL, stderr=err)
      kind = None
      if life <= kills:
        kind = rng.choice(["startup", "running", "during_write", "during_write"])
        if startup_s is None and kind == "startup":
          kind = "running"  # the first life measures how long starting takes
        start = time.monotonic()
        deadline = start + rng.uniform(0.1, 1.0) * (startup_s or 0.0)
        after_progress = None
        while proc.poll() is None:
          done, writing = _steps(checkpoints)
          progressed = bool(done) and done[-1] > last
          if progressed and startup_s is None:
            startup_s = time.monotonic() - start
          if kind == "startup" and time.monotonic() >= deadline:
            break
          if kind == "running" and progressed:
            after_progress = after_progress or time.monotonic() + rng.uniform(0.0, 1.5)
            if time.monotonic() >= after_progress:
              break
          if kind == "during_write" and progressed and writing:
            break
          time.sleep(0.002)
        if proc.poll() is None:
          proc.send_signal(signal.SIGKILL)
          proc.wait()
          stats[kind] += 1
          complete, writing = _steps(checkpoints)  # as the dead process left them
          log(f"life {life}: SIGKILL ({kind}); complete checkpoints {complete}, partly "
              f"written {writing}")
          if writing:
            stats["partial_left"] = stats.get("partial_left", 0) + 1
          _check_restore(life, workdir, complete_after_kill, problems, log)
          complete_after_kill = complete
          stats["restarts"] += 1
          continue
      rc = proc.wait()
    if rc:
      sys.exit(f"life {life} failed with status {rc}:\n{open(err_path).read()[-4000:]}")
    _check_restore(life, workdir, complete_after_kill, problems, log, must_restore=True)
    log(f"life {life}: finished")
    return stats, problems


def _check_restore(life, workdir, complete, problems, log, must_restore=False):
  """The life restored the newest checkpoint complete when the one before it died, if any.

  A life killed early may not have got to its restore; one that finished must have restored
  (a run that silently started afresh would end equal too, having lost its progress)."""
  if not complete:
    return
  text = open(os.path.join(workdir, f"life_{life}.log")).read()
  restored = [int(s) for s in _RESTORED.findall(text)]
  if must_restore and not restored:
    problems.append(f"life {life} did not restore the checkpoint of step {complete[-1]}")
    log(problems[-1])
  if restored and restored[0] != complete[-1]:
    problems.append(f"life {life} restored step {restored[0]}, not the newest complete "
                    f"checkpoint {complete[-1]}")
    log(problems[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kills", type=int, default=12, help="how many lives to SIGKILL")
  parser.add_argument("--steps", type=int, default=16, help="training steps of the run")
  parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
  parser.add_argument("--workdir", default="", help="where to keep both runs (default: a "
                                                     "temporary directory)")
  args = parser.parse_args()
  rng = random.Random(args.seed)
  root = args.workdir or tempfile.mkdtemp(prefix="chaos_resume_")
  data_dir = os.path.join(root, "tensorflow_datasets")
  log = lambda text: print(text, flush=True)

  straight_dir, chaos_dir = os.path.join(root, "straight"), os.path.join(root, "killed")
  seconds = run_straight(straight_dir, data_dir, args.steps)  # prepares the dataset too
  log(f"straight run: {args.steps} steps in {seconds:.1f} s (with the dataset preparation)")
  stats, problems = run_with_kills(chaos_dir, data_dir, args.steps, args.kills, rng, log)

  step_a, straight = load_state(straight_dir)
  step_b, killed = load_state(chaos_dir)
  differ = [k for k in straight if k not in killed or not np.array_equal(
      straight[k], killed[k], equal_nan=True) or straight[k].dtype != killed[k].dtype]
  differ += [k for k in killed if k not in straight]
  total = stats["startup"] + stats["running"] + stats["during_write"]
  log(f"\nkills survived: {total} (while starting or restoring: {stats['startup']}, while "
      f"training: {stats['running']}, while a checkpoint was being written: "
      f"{stats['during_write']}); kills that left a partly written checkpoint behind: "
      f"{stats.get('partial_left', 0)}")
  log(f"final step: straight {step_a}, killed {step_b}; arrays compared: {len(straight)}, "
      f"differing: {len(differ)}")
  if total < args.kills:
    log(f"(the run finished after {total} of the {args.kills} kills asked for: give more --steps)")
  if differ or step_a != step_b or step_a != args.steps or problems:
    for k in differ[:10]:
      log(f"  differs: {k}")
    sys.exit("FAIL: the killed run does not equal the straight run")
  log("OK: the killed and restarted run equals the straight run bit for bit, and every restart "
      "restored the newest complete checkpoint, never a partly written one")


if __name__ == "__main__":
  main()
