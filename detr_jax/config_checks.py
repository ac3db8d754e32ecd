"""Checks of an experiment config that fail at start, in one line, instead of hours in.

`check_train_config(config, workdir)` runs before the dataset is prepared and before anything is
compiled; `check_eval_config(config)` the same for evaluation and prediction. Each problem raises
`ConfigError`, whose message names the field and the fix in one line. The command-line entry
points (`detr_jax.cli.run`) print it as `error: ...` without a traceback and exit with status 2.

The fields a config may have are those of `configs/detr_r50_coco.py` (every config builds on it)
plus the synthetic-shapes fields of `config.dataset` (`OPTIONAL_FIELDS`); anything else is a
misspelling.
"""

import ast
import difflib
import math
import os
import runpy
import tempfile
from typing import Any, Iterable

import ml_collections

# The learning-rate schedules of `detr_jax.optimizer.create_learning_rate_schedule`.
OPTIMIZER_SCHEDULES = ("step", "cosine", "linear", "constant")
# Adam's moment decays in config.optimizer and their defaults (torch's, the official ones).
ADAM_BETA_DEFAULTS = (("b1", 0.9), ("b2", 0.999))

# Fields read with a default but absent from the reference config.
OPTIONAL_FIELDS = frozenset({
    "dataset.image_size", "dataset.max_objects", "dataset.num_train_examples",
    "dataset.num_eval_examples", "dataset.shapes_seed",
})


class ConfigError(ValueError):
  """A config that cannot work; the message names the field and the fix, in one line."""


def load_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file; "FILE:ARG" passes ARG (as `--config=FILE:ARG` does)."""
  file, _, arg = path.partition(":")
  get_config = runpy.run_path(file)["get_config"]
  return get_config(arg) if arg else get_config()


def set_field(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """config["a"]["b"] = value for key "a.b"."""
  node = config
  *parents, leaf = key.split(".")
  for name in parents:
    node = node[name]
  node[leaf] = value


def apply_overrides(config: ml_collections.ConfigDict, items: Iterable[str]) -> None:
  """Sets "field.path=VALUE" items in place; VALUE is a Python literal, else a string."""
  for item in items:
    key, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    set_field(config, key, value)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"model.num_queries": value, ...}: a config's leaves by dotted name."""
  out = {}
  items = tree.items() if hasattr(tree, "items") else []
  for key, value in items:
    name = f"{prefix}{key}"
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def reference_fields() -> frozenset[str]:
  """Every field name a config may have, dotted ("model.num_queries")."""
  from configs import detr_r50_coco  # pylint: disable=g-import-not-at-top
  return frozenset(flatten(detr_r50_coco.get_config())) | OPTIONAL_FIELDS


def suggest(name: str, known: Iterable[str]) -> str:
  """' Did you mean config.X?' for the closest known field, or ''."""
  known = list(known)
  leaf = name.rsplit(".", 1)[-1]
  parent = name.rsplit(".", 1)[0] if "." in name else ""
  siblings = [k for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
  close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
  if not close and siblings:
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in siblings}
    leaves = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    close = [by_leaf[leaves[0]]] if leaves else []
  if not close:  # the right leaf under another section: dataset.lr -> optimizer.lr
    close = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:1]
  return f" Did you mean config.{close[0]}?" if close else ""


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a field no part of the code reads (a misspelling)."""
  known = reference_fields()
  unknown = sorted(set(flatten(config)) - known)
  if unknown:
    name = unknown[0]
    more = f" (and {len(unknown) - 1} more: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
    raise ConfigError(f"config.{name} is not a config field, so it would be ignored{more}."
                      f"{suggest(name, known)}")


def _num_devices(num_devices: int | None) -> int:
  if num_devices is not None:
    return int(num_devices)
  import jax  # pylint: disable=g-import-not-at-top
  return jax.device_count()


def check_batch_size(config, name: str, num_devices: int | None = None) -> None:
  n = _num_devices(num_devices)
  value = int(config[name])
  if value <= 0 or value % n:
    fix = max(n, (max(value, 1) // n) * n)
    raise ConfigError(f"config.{name}={value} does not divide over the {n} devices: set "
                      f"--config.{name}={fix} (a positive multiple of {n}).")


def check_buckets(ds, training: bool) -> None:
  """The largest bucket must hold every image the resize can make (sides up to max_size)."""
  buckets = [tuple(int(v) for v in b) for b in ds.buckets]
  if not buckets:
    raise ConfigError("config.dataset.buckets is empty: give at least one (height, width), "
                      "e.g. --config.dataset.buckets='((800, 1333), (1333, 1333))'.")
  max_h = max(b[0] for b in buckets)
  max_w = max(b[1] for b in buckets)
  limits = [("eval_max_size", ds.get("eval_max_size"))]
  if training:
    limits.insert(0, ("max_size", ds.get("max_size")))
  for name, limit in limits:
    if limit is None or int(limit) <= 0:
      continue
    limit = int(limit)
    if max_h < limit or max_w < limit:
      raise ConfigError(
          f"config.dataset.buckets={tuple(buckets)} cannot hold the {limit}-pixel sides that "
          f"config.dataset.{name}={limit} allows (largest bucket {max_h} x {max_w}); images "
          f"would be shrunk to fit: add the bucket ({max(max_h, limit)}, {max(max_w, limit)}) "
          f"or lower --config.dataset.{name}.")


def check_eval_padding(ds) -> None:
  from detr_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    input_pipeline.eval_padding(ds)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_cache_train_resized(ds_config) -> None:
  """Raises ConfigError unless `cache_train_resized` can hold the training geometry fixed."""
  problems = []
  if not ds_config.get("cache_train", False):
    problems.append("config.dataset.cache_train is False")
  if ds_config.get("augmentation", "detr") != "fixed":
    problems.append(f"config.dataset.augmentation is {ds_config.get('augmentation', 'detr')!r}")
  if len(ds_config.scales) != 1:
    problems.append(f"config.dataset.scales={tuple(ds_config.scales)} is not one size")
  if problems:
    raise ConfigError(
        "config.dataset.cache_train_resized resizes each training image once, so it needs "
        "cache_train=True, augmentation='fixed' and one size in scales; here "
        + "; ".join(problems) + ". Set --config.dataset.cache_train_resized=False, or change "
        "those fields.")


def check_path_exists(config, name: str) -> None:
  path = str(config.get(name, "") or "")
  if not path or "://" in path:  # remote paths are checked where they are opened
    return
  if not os.path.exists(path):
    what = ("a `python -m detr_jax.convert` output folder" if name == "init_from"
            else "a torchvision ResNet .pth or .safetensors file")
    raise ConfigError(f"config.{name}={path!r} does not exist: give {what}, or "
                      f"--config.{name}='' to start without it.")


def check_workdir(workdir: str) -> None:
  if "://" in workdir:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_check_"):
      pass
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not a writable directory ({e.strerror}): give a "
                      "directory this user can create and write.") from None


def check_train_config(config: ml_collections.ConfigDict, workdir: str | None = None,
                       num_devices: int | None = None) -> None:
  """Every check of a training run; raises ConfigError with the first problem."""
  check_fields(config)
  for name in ("batch_size", "eval_batch_size"):
    check_batch_size(config, name, num_devices)
  check_buckets(config.dataset, training=True)
  check_eval_padding(config.dataset)
  num_queries, max_boxes = int(config.model.num_queries), int(config.dataset.max_boxes)
  if num_queries < max_boxes:
    raise ConfigError(
        f"config.model.num_queries={num_queries} is smaller than config.dataset.max_boxes="
        f"{max_boxes}: one-to-one matching cannot give every target box a query; set "
        f"--config.model.num_queries={max_boxes} or more (or lower --config.dataset.max_boxes).")
  one_to_many = int(config.model.get("one_to_many_queries", 0))
  k = int(config.loss.get("one_to_many_k", 6))
  if one_to_many and one_to_many < k * max_boxes:
    raise ConfigError(
        f"config.model.one_to_many_queries={one_to_many} is smaller than config.loss."
        f"one_to_many_k * config.dataset.max_boxes = {k} * {max_boxes}: the repeated targets "
        f"need a query each; set --config.model.one_to_many_queries={k * max_boxes} or more.")
  order = config.loss.get("cost_query_order", 0.0)
  if not isinstance(order, (int, float)) or not math.isfinite(order):
    raise ConfigError(f"config.loss.cost_query_order={order!r} must be a finite number (0: the "
                      "official matching cost).")
  if config.dataset.get("cache_train_resized", False):
    check_cache_train_resized(config.dataset)
  accum = int(config.optimizer.get("grad_accum_steps", 1))
  if accum < 1:
    raise ConfigError(f"config.optimizer.grad_accum_steps={accum} must be >= 1.")
  if config.optimizer.get("schedule", "step") not in OPTIMIZER_SCHEDULES:
    raise ConfigError(f"config.optimizer.schedule={config.optimizer.schedule!r} is unknown; use "
                      f"one of {OPTIMIZER_SCHEDULES}.")
  for name, default in ADAM_BETA_DEFAULTS:
    value = config.optimizer.get(name, default)
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
      raise ConfigError(f"config.optimizer.{name}={value!r} must be in [0, 1) (Adam's moment "
                        "decay; 0.9 and 0.999 are the official b1 and b2).")
  for name in ("init_from", "backbone_init"):
    check_path_exists(config, name)
  if config.model.get("backbone_norm", "frozen_bn") != "frozen_bn" and config.get(
      "backbone_init", ""):
    raise ConfigError(
        f"config.backbone_init={config.backbone_init!r} holds BatchNorm statistics, which "
        f"config.model.backbone_norm={config.model.backbone_norm!r} has no place for: use "
        "--config.model.backbone_norm=frozen_bn with pretrained weights, or "
        "--config.backbone_init='' to train the backbone from scratch.")
  if workdir is not None:
    check_workdir(workdir)


def check_eval_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """The checks of evaluation and prediction; raises ConfigError with the first problem."""
  check_fields(config)
  check_batch_size(config, "eval_batch_size", num_devices)
  check_eval_padding(config.dataset)
  check_buckets(config.dataset, training=False)
