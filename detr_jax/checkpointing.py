"""Checkpoints: orbax CheckpointManager for the train state, preemption handling, weight loading.

Training checkpoints live in `<workdir>/checkpoints/<step>` and hold the whole train state
(step, params, batch_stats, opt_state, rng), so a restarted job resumes bit for bit: the input
pipeline restarts at the restored step and the dropout keys are folded from (rng, step).
Saves are asynchronous; `wait_until_finished` is called before the program exits.

Pretrained weights (`config.init_from`, a directory written by `python -m detr_jax.convert`) are
merged into a freshly initialised state with `merge_pretrained`.
"""

import os
import signal
import threading
from typing import Any, Iterable

from absl import logging
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"


def create_checkpoint_manager(
    workdir: str, keep: int = 3, save_every: int = 1, read_only: bool = False,
    directory: str | None = None) -> ocp.CheckpointManager:
  """Returns an orbax CheckpointManager writing asynchronously to `<workdir>/checkpoints`.

  Args:
    workdir: training work directory.
    keep: how many recent checkpoints to keep (`config.keep_checkpoints`).
    save_every: `config.checkpoint_every_steps`; `should_save` is true on multiples of it.
    read_only: open an existing directory for restoring only (evaluation).
    directory: checkpoint directory to use instead of `<workdir>/checkpoints`.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=max(int(save_every), 1), create=not read_only,
      read_only=read_only, enable_async_checkpointing=True)
  directory = directory or os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
  return ocp.CheckpointManager(directory, options=options)


def find_checkpoint_dir(path: str) -> str | None:
  """Returns the orbax step directory root for a workdir or checkpoints dir, None if neither."""
  for candidate in (os.path.join(path, CHECKPOINT_SUBDIR), path):
    if os.path.isdir(candidate) and any(
        name.isdigit() and os.path.isdir(os.path.join(candidate, name))
        for name in os.listdir(candidate)):
      return candidate
  return None


def save(manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> bool:
  """Starts an asynchronous save of `state` at `step`; returns whether a save started."""
  saved = manager.save(step, args=ocp.args.StandardSave(state), force=force)
  if saved:
    logging.info("Saving checkpoint of step %d to %s (async).", step, manager.directory)
  return saved


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
  """Restores the checkpoint at `step` (default: latest) into the structure and shardings of
  `abstract_state` (a tree of jax.ShapeDtypeStruct with `.sharding`, or of arrays)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"No checkpoint in {manager.directory}.")
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  logging.info("Restoring checkpoint of step %d from %s.", step, manager.directory)
  return manager.restore(step, args=ocp.args.StandardRestore(target))


class NoReadableCheckpointError(RuntimeError):
  """Every checkpoint in the directory failed to restore."""


def restore_latest_readable(manager: ocp.CheckpointManager, abstract_state: Any) -> Any:
  """Restores the newest checkpoint that can be read, newest first.

  A checkpoint whose files are truncated or corrupted (a disk filled up, a copy cut short) is
  skipped with a warning naming it and the one used instead.

  Raises:
    NoReadableCheckpointError: there are checkpoints and none of them can be read.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  failures = []
  for step in steps:
    try:
      state = restore(manager, abstract_state, step)
    except Exception as e:  # pylint: disable=broad-except
      failures.append(f"step {step}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
      logging.warning("Checkpoint of step %d in %s cannot be read (%s); trying an older one.",
                      step, manager.directory, failures[-1])
      continue
    if failures:
      logging.warning("Resumed from the checkpoint of step %d instead of the newest, step %d, "
                      "which cannot be read.", step, steps[0])
    return state
  raise NoReadableCheckpointError(
      f"No checkpoint in {manager.directory} can be read: " + "; ".join(failures) +
      ". Move the directory away to start afresh, or restore it from a copy.")


class PreemptionFlag:
  """Set on SIGTERM (and SIGINT if asked): the training loop then saves and exits cleanly.

  On several processes the decision must be the same everywhere, so `should_stop` also asks
  jax's preemption sync point (available when jax.distributed is initialised).
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: will checkpoint and stop after this step.", signum)
    self._event.set()

  def set(self):
    self._event.set()

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop now (same answer on every process)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return True
      except RuntimeError:  # preemption service not initialised
        pass
      # A local flag only: agree on it across processes.
      local = np.asarray([self._event.is_set()], np.int32)
      return bool(multihost_utils.process_allgather(local).max())
    return self._event.is_set()

  def restore_handlers(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def merge_pretrained(
    fresh: Any, loaded: Any, reinit_on_mismatch: tuple[str, ...] = ("class_embed",),
    name: str = "params") -> tuple[Any, list[str]]:
  """Copies pretrained leaves into a freshly initialised tree.

  Every leaf of `loaded` must exist in `fresh`. Leaves whose shapes differ keep their fresh
  value when their path starts with a name in `reinit_on_mismatch` (e.g. the class head of a
  model fine-tuned on a dataset with another number of classes); elsewhere a mismatch is an error.

  Args:
    fresh: freshly initialised tree (nested dicts of arrays).
    loaded: pretrained tree, possibly a subtree (e.g. only the backbone).
    reinit_on_mismatch: top-level names whose shape mismatch means "keep the fresh init".
    name: collection name for messages.

  Returns:
    (merged tree, list of "/"-joined paths kept at their fresh init because of a shape mismatch).

  Raises:
    ValueError: when `loaded` holds a path the model does not have, or a shape differs outside
      `reinit_on_mismatch`.
  """
  fresh_flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(fresh), sep="/")
  loaded_flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(loaded), sep="/")
  # Training-only queries (Group DETR, H-DETR) carry over only to a model that has them.
  from detr_jax import models  # pylint: disable=g-import-not-at-top
  loaded_flat = {k: v for k, v in loaded_flat.items()
                 if k in fresh_flat or k.split("/")[0] not in models.TRAINING_ONLY_PARAMS}
  unknown = sorted(set(loaded_flat) - set(fresh_flat))
  if unknown:
    raise ValueError(
        f"Pretrained {name} have {len(unknown)} entries the model does not have, e.g. "
        f"{unknown[:5]}: the checkpoint was converted with another model config "
        "(backbone, layers, position embedding?). Use the config it was converted with.")
  merged, reinitialised = dict(fresh_flat), []
  for path, value in loaded_flat.items():
    target = fresh_flat[path]
    if tuple(np.shape(value)) != tuple(np.shape(target)):
      if path.split("/")[0] in reinit_on_mismatch:
        reinitialised.append(path)
        continue
      raise ValueError(
          f"Pretrained {name} {path} has shape {np.shape(value)} but the model has "
          f"{np.shape(target)}: the config differs from the converted checkpoint's.")
    merged[path] = np.asarray(value, dtype=np.asarray(target).dtype)
  missing = sorted(set(fresh_flat) - set(loaded_flat))
  if missing:
    logging.info("%d %s entries not in the pretrained weights keep their fresh init, e.g. %s.",
                 len(missing), name, missing[:5])
  if reinitialised:
    logging.warning("Shape mismatch: %s keep their fresh init (fine-tuning on another number "
                    "of classes).", reinitialised)
  return flax.traverse_util.unflatten_dict(merged, sep="/"), reinitialised


def load_variables(path: str) -> dict[str, Any]:
  """{"params", "batch_stats"} for inference from a training workdir, its checkpoints dir (the
  latest step) or a directory written by `python -m detr_jax.convert`.

  Raises:
    ValueError: `path` is none of these.
  """
  ckpt_dir = find_checkpoint_dir(path)
  if ckpt_dir is not None:
    manager = create_checkpoint_manager(path, read_only=True, directory=ckpt_dir)
    step = manager.latest_step()
    logging.info("Loading training checkpoint of step %d in %s.", step, ckpt_dir)
    restored = manager.restore(step, args=ocp.args.StandardRestore())
    get = restored.get if isinstance(restored, dict) else lambda k: getattr(restored, k)
    return {"params": get("params"), "batch_stats": get("batch_stats")}
  from detr_jax import convert  # pylint: disable=g-import-not-at-top
  try:
    return dict(convert.load_variables(path))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"{path} is neither a training workdir/checkpoint dir nor a directory written by "
        f"`python -m detr_jax.convert`: {e}") from e
