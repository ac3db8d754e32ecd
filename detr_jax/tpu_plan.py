r"""Plan a TPU pod run without a TPU: compile the real train and eval steps for a TPU slice.

With the `libtpu` wheel installed (`pip install -e ".[tpu]"`), JAX compiles for a TPU topology on
any machine: `jax.experimental.topologies.get_topology_desc("v5e:4x4", "tpu")` gives compile-only
devices, and `jax.jit(...).lower(...).compile()` on a mesh of them is the TPU program a pod would
run, with XLA's own `memory_analysis()` and `cost_analysis()`. Nothing executes.

  python -m detr_jax.tpu_plan --config configs/detr_r50_coco.py --topology v5e:8x8
  python -m detr_jax.tpu_plan --config configs/detr_r50_coco.py --config.model.dtype=bfloat16 \
      --topology v4:2x2x4 --topology v5p:2x2x4 --buckets largest

For each topology and bucket it compiles `train.make_train_step` (host Hungarian matching
callback included) and the evaluation step (`inference.make_predict_fn`) and prints, per chip:
the batch, HBM for arguments and temporaries against the chip's capacity, FLOPs per step, the
roofline step time (FLOPs / peak bfloat16 FLOP/s) and the images/s, epoch time and full-schedule
time at `--mfu` of that peak, and whether it fits; for a bucket that does not fit, the per-chip
batch that would (temporaries scale with the batch, arguments do not).

Figures are XLA's estimates for one chip of the SPMD program; the step time assumes the host
input pipeline and the matching callback keep up. Library use: `plan(config, topology)`.
"""

import contextlib
import dataclasses
import re
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache
import ml_collections

from detr_jax import inference
from detr_jax import parallel
from detr_jax import train

GiB = 1024**3

# Per chip: HBM capacity and peak dense bfloat16 FLOP/s. Sources (Google Cloud TPU docs, system
# architecture pages): https://cloud.google.com/tpu/docs/v4 (32 GiB, 275 TFLOP/s),
# https://cloud.google.com/tpu/docs/v5e (16 GiB, 197 TFLOP/s),
# https://cloud.google.com/tpu/docs/v5p (95 GiB, 459 TFLOP/s),
# https://cloud.google.com/tpu/docs/v6e (32 GiB, 918 TFLOP/s).
CHIPS = {
    "v4": {"hbm_bytes": 32 * GiB, "peak_bf16_flops": 275e12},
    "v5e": {"hbm_bytes": 16 * GiB, "peak_bf16_flops": 197e12},
    "v5p": {"hbm_bytes": 95 * GiB, "peak_bf16_flops": 459e12},
    "v6e": {"hbm_bytes": 32 * GiB, "peak_bf16_flops": 918e12},
}


_MEGACORE = ("v4", "v5p")


@dataclasses.dataclass
class StepPlan:
  """What the TPU compiler reports for one step on one chip.

  A step that does not fit is one the compiler refused (RESOURCE_EXHAUSTED): then only
  `temp_bytes` (from its message) is known, and `fitting_batch` is the largest smaller per-chip
  batch that compiled (0: none, not even one image).
  """
  program: str  # "train" or "eval"
  bucket: tuple[int, int]
  per_chip_batch: int
  fits: bool
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  flops: float = 0.0
  compile_seconds: float = 0.0
  error: str = ""
  fitting_batch: int | None = None

  @property
  def total_bytes(self) -> int:
    # Donated (aliased) outputs reuse their argument buffers.
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass
class TopologyPlan:
  topology: str
  chip: str
  num_chips: int
  hbm_bytes: int
  peak_flops: float
  steps: list[StepPlan]


def chip_generation(topology: str) -> str:
  """"v5e:4x4" -> "v5e"; raises for a chip not in CHIPS."""
  name = topology.split(":")[0].lower()
  if name == "v5litepod":
    name = "v5e"
  if name not in CHIPS:
    raise ValueError(f"Unknown TPU generation in topology {topology!r}; known: {sorted(CHIPS)} "
                     "(written like 'v5e:4x4' or 'v4:2x2x2').")
  return name


def topology_devices(topology: str) -> list[Any]:
  """Compile-only devices of a TPU slice (needs libtpu, no TPU)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Compiling needs no exclusive hold on a TPU: let several planning processes load libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # v4 and v5p chips have two TensorCores that JAX drives as one device ("megacore", what a
  # v4/v5p TPU VM runs); without it libtpu lists a device per core and a mesh cannot be made.
  kwargs = {"chip_config_name": "megacore"} if chip_generation(topology) in _MEGACORE else {}
  try:
    desc = topologies.get_topology_desc(topology, "tpu", **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"Could not get TPU topology {topology!r}: {e}\nPlanning needs the libtpu wheel that "
        "matches this jax: pip install -e \".[tpu]\"") from e
  return list(desc.devices)


def planning_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config as a TPU would run it."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.num_classes <= 0:
    raise ValueError("config.model.num_classes must be set to plan (the dataset is not read): "
                     "--config.model.num_classes=N.")
  # "auto" would resolve for this CPU (1x1 convolutions as dots); a TPU uses XLA's convolutions.
  if config.model.get("conv_implementation", "auto") == "auto":
    config.model.conv_implementation = "xla"
  if config.get("steps_per_epoch", -1) <= 0:
    num = config.dataset.get("num_train_examples", -1)
    if num <= 0:
      raise ValueError("Set config.steps_per_epoch (or dataset.num_train_examples) to plan.")
    config.steps_per_epoch = max(int(num) // config.batch_size, 1)
  return config


def _train_batch(config, global_batch, bucket):
  height, width = bucket
  m = config.dataset.max_boxes
  spec = jax.ShapeDtypeStruct
  return {
      "images": spec((global_batch, height, width, 3), jnp.float32),
      "pixel_mask": spec((global_batch, height, width), jnp.bool_),
      "labels": spec((global_batch, m), jnp.int32),
      "boxes": spec((global_batch, m, 4), jnp.float32),
      "valid": spec((global_batch, m), jnp.bool_),
  }


def _memory(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  return {"argument_bytes": int(stats.argument_size_in_bytes),
          "output_bytes": int(stats.output_size_in_bytes),
          "alias_bytes": int(stats.alias_size_in_bytes),
          "temp_bytes": int(stats.temp_size_in_bytes)}


def program_flops(program) -> float:
  """XLA's count of floating-point operations of a lowered or compiled program."""
  cost = program.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return float(cost.get("flops", 0.0))


_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\)")


@contextlib.contextmanager
def _no_persistent_cache():
  """JAX's persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`) off for the block.

  A program compiled for compile-only TPU devices cannot be loaded back from the cache on a
  machine without a TPU: JAX would warn that it cannot read the entry and compile again.
  """
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # JAX decides once whether the cache is used
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def _compile(program: str, bucket, per_chip_batch: int, lowered_fn) -> StepPlan:
  """Compiles `lowered_fn()`; a program the TPU compiler finds too large for HBM does not fit."""
  start = time.perf_counter()
  try:
    with _no_persistent_cache():
      compiled = lowered_fn().compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    match = _OOM.search(str(e))
    temp = 0
    if match:
      temp = int(float(match.group(1)) * 1024**" KMGT".index(match.group(2) or " "))
    return StepPlan(program, tuple(bucket), per_chip_batch, fits=False, temp_bytes=temp,
                    compile_seconds=time.perf_counter() - start,
                    error=str(e).strip().splitlines()[0])
  return StepPlan(program, tuple(bucket), per_chip_batch, fits=True, **_memory(compiled),
                  flops=program_flops(compiled), compile_seconds=time.perf_counter() - start)


def compile_train_step(config, mesh, per_chip_batch: int, bucket) -> StepPlan:
  """`train.make_train_step` (host matching callback included) for `mesh`, compiled."""
  num_chips = mesh.devices.size
  model, tx, labels, schedules = train.build(config, mesh, train.total_train_steps(config))
  state = jax.eval_shape(lambda: train.create_train_state(config, model, tx, mesh,
                                                          jax.random.PRNGKey(0)))
  step = train.make_train_step(config, model, tx, labels, mesh, schedules)
  batch = _train_batch(config, per_chip_batch * num_chips, bucket)
  return _compile("train", bucket, per_chip_batch, lambda: step.lower(state, batch))


def compile_eval_step(config, mesh, per_chip_batch: int, bucket) -> StepPlan:
  """The evaluation step (`inference.make_predict_fn`: model and post-processing), compiled."""
  num_chips = mesh.devices.size
  model = train.build(config, mesh, 1)[0]
  variables = jax.eval_shape(lambda: train.init_variables(config, model, jax.random.PRNGKey(0)))
  predict = inference.make_predict_fn(model, mesh, inference.label_activation(config))
  b = per_chip_batch * num_chips
  height, width = bucket
  spec = jax.ShapeDtypeStruct
  return _compile("eval", bucket, per_chip_batch, lambda: predict.lower(
      variables, spec((b, height, width, 3), jnp.float32), spec((b, height, width), jnp.bool_),
      spec((b, 2), jnp.int32)))


_COMPILERS = {"train": compile_train_step, "eval": compile_eval_step}


def find_fitting_batch(config, mesh, step: StepPlan) -> int:
  """Largest per-chip batch below `step.per_chip_batch` that compiles (binary search; 0: none)."""
  compile_fn = _COMPILERS[step.program]
  lo, hi = 0, step.per_chip_batch  # lo fits (0 trivially), hi does not
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if compile_fn(config, mesh, mid, step.bucket).fits:
      lo = mid
    else:
      hi = mid
  return lo


def select_buckets(config, which: str) -> list[tuple[int, int]]:
  buckets = [tuple(int(v) for v in b) for b in config.dataset.buckets]
  if which == "all":
    return buckets
  if which == "largest":
    return [max(buckets, key=lambda b: b[0] * b[1])]
  raise ValueError(f"--buckets must be 'all' or 'largest', got {which!r}.")


def plan(config: ml_collections.ConfigDict, topology: str, per_chip_batch: int = 0,
         eval_per_chip_batch: int = 0, buckets: str = "all",
         programs: Sequence[str] = ("train", "eval")) -> TopologyPlan:
  """Compiles the config's steps for `topology`; per-chip batches default to the config's."""
  config = planning_config(config)
  chip = chip_generation(topology)
  devices = topology_devices(topology)
  mesh = parallel.create_mesh(devices)
  n = len(devices)
  per_chip_batch = per_chip_batch or max(config.batch_size // n, 1)
  eval_per_chip_batch = eval_per_chip_batch or max(config.eval_batch_size // n, 1)
  bad = set(programs) - set(_COMPILERS)
  if bad:
    raise ValueError(f"programs are 'train' and/or 'eval', got {sorted(bad)}.")
  steps = []
  for bucket in select_buckets(config, buckets):
    for program in ("train", "eval"):
      if program in programs:
        batch = per_chip_batch if program == "train" else eval_per_chip_batch
        step = _COMPILERS[program](config, mesh, batch, bucket)
        if not step.fits:
          step.fitting_batch = find_fitting_batch(config, mesh, step)
        steps.append(step)
  return TopologyPlan(topology, chip, n, CHIPS[chip]["hbm_bytes"],
                      CHIPS[chip]["peak_bf16_flops"], steps)


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.1f} s"
  if seconds < 2 * 3600:
    return f"{seconds / 60:.1f} min"
  if seconds < 2 * 86400:
    return f"{seconds / 3600:.1f} h"
  return f"{seconds / 86400:.1f} days"


def _gib(num_bytes: int) -> str:
  return f"{num_bytes / GiB:.3g}"


def format_plan(p: TopologyPlan, config: ml_collections.ConfigDict, mfu: float) -> str:
  """A markdown table for one topology, with the verdict lines under it.

  Times: the roofline step is FLOPs per chip over the chip's peak bfloat16 rate; images/s, the
  epoch (config.steps_per_epoch x config.batch_size images) and the schedule
  (train.total_train_steps) follow at `mfu` of that peak.
  """
  config = planning_config(config)
  epoch_images = int(config.steps_per_epoch) * int(config.batch_size)
  epochs = train.total_train_steps(config) / int(config.steps_per_epoch)
  lines = [
      f"{p.topology}: {p.num_chips} {p.chip} chips, {p.hbm_bytes / GiB:.0f} GiB HBM and "
      f"{p.peak_flops / 1e12:.0f} TFLOP/s bf16 each; model.dtype={config.model.dtype}; times at "
      f"{mfu:.0%} MFU; epoch = {epoch_images} images, schedule = {epochs:g} epochs",
      "",
      "| step | bucket | batch/chip | args GiB | temp GiB | total GiB | fits | TFLOP/chip | "
      "roofline step | images/s | epoch | schedule | compile |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  notes = []
  for s in p.steps:
    bucket = f"{s.bucket[0]}x{s.bucket[1]}"
    if not s.fits:
      lines.append(f"| {s.program} | {bucket} | {s.per_chip_batch} | - | {_gib(s.temp_bytes)} | "
                   f"- | NO | - | - | - | - | - | {s.compile_seconds:.0f} s |")
      fitting = (f"{s.fitting_batch} images per chip compile"
                 if s.fitting_batch else "not even 1 image per chip compiles")
      notes.append(f"- {s.program} {bucket} does NOT fit at {s.per_chip_batch} images per chip "
                   f"(the compiler: {s.error}); {fitting}.")
      continue
    roofline = s.flops / p.peak_flops
    images_per_s = s.per_chip_batch * p.num_chips * mfu / roofline if roofline else float("inf")
    epoch = schedule = "-"
    if s.program == "train":
      epoch = _duration(epoch_images / images_per_s)
      schedule = _duration(epochs * epoch_images / images_per_s)
    lines.append(
        f"| {s.program} | {bucket} | {s.per_chip_batch} | {_gib(s.argument_bytes)} | "
        f"{_gib(s.temp_bytes)} | {_gib(s.total_bytes)} | yes | {s.flops / 1e12:.3g} | "
        f"{roofline * 1e3:.3g} ms | {images_per_s:.4g} | {epoch} | {schedule} | "
        f"{s.compile_seconds:.0f} s |")
  lines.append("")
  lines.extend(notes or ["Everything fits."])
  return "\n".join(lines)


# ------------------------------------------------------------------ command line
def _define_flags():
  """The command's flags; defined only when this module runs as the program."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file to plan.")
  flags.DEFINE_multi_string("topology", None, "TPU slice, e.g. v5e:4x4, v4:2x2x4, v5p:2x2x4.")
  flags.DEFINE_integer("per_chip_batch", 0, "Train images per chip (0: config.batch_size / "
                       "chips).")
  flags.DEFINE_integer("eval_per_chip_batch", 0, "Eval images per chip (0: "
                       "config.eval_batch_size / chips).")
  flags.DEFINE_enum("buckets", "all", ["all", "largest"], "Which dataset.buckets to compile.")
  flags.DEFINE_list("programs", ["train", "eval"], "Steps to compile: train, eval.")
  flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for times.")
  flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  bad = set(FLAGS.programs) - {"train", "eval"}
  if bad:
    raise ValueError(f"--programs takes train and/or eval, got {sorted(bad)}.")
  if not 0 < FLAGS.mfu <= 1:
    raise ValueError(f"--mfu must be in (0, 1], got {FLAGS.mfu}.")
  any_misfit = False
  for topology in FLAGS.topology:
    p = plan(FLAGS.config, topology, FLAGS.per_chip_batch, FLAGS.eval_per_chip_batch,
             FLAGS.buckets, FLAGS.programs)
    print(format_plan(p, FLAGS.config, FLAGS.mfu), flush=True)
    print(flush=True)
    any_misfit |= not all(s.fits for s in p.steps)
  if any_misfit:
    sys.exit(3)


if __name__ == "__main__":
  # The command needs no accelerator: JAX's runtime stays on the CPU (libtpu would otherwise try
  # to open a local TPU, and warn at length where there is none); the TPU compiler is used all
  # the same. Set before jax creates a backend.
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  _define_flags()
  from detr_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
