r"""Time to accuracy: trains the baseline and the training variants with the same seed and the same
time budget, evaluating COCO AP along the way; writes a PNG plot and a markdown table.

Each variant is the config (`--config`, default the shapes demo) plus its overrides:
  baseline      the config as it is
  group_detr    Group DETR, model.num_query_groups=3
  one_to_many   H-DETR's one-to-many branch, model.one_to_many_queries=48, loss.one_to_many_k=4
  group_norm    model.backbone_norm=group_norm (the shapes backbone trains from scratch)
  anchors       anchor-point queries, model.query_anchors=True
  group_o2m     group_detr and one_to_many together
  denoising     anchors with DN-DETR's denoising queries, model.denoising_groups=4
  refinement    anchors with box refinement, model.box_refinement=True
Training minutes are wall-clock seconds of the train steps (compilation included, as a user
waits for it), evaluation excluded; "images with duplicates" counts the evaluation images in
which some object is detected twice at the drawing threshold (`evaluate.CocoEvaluator.
threshold_report`); the learning-rate schedule runs over `num_train_steps` of the
config, whatever the budget.

One run is one sample: on the 6-minute shapes recipe (configs/shapes.py), runs of one recipe
with different seeds ended up to 0.1 AP apart (README, "Matching and loss"). `--seeds 0,1,2`
trains every variant once per seed (`config.seed`: initialisation and data order) and adds a
table of the final evaluation's mean, min and max over the seeds; the plot shows each variant's
mean and its min-max band.

Command:
  PYTHONPATH=. python experiments/convergence.py --minutes 6 --evals 4 --output /tmp/convergence
"""

import argparse
import json
import os
import time

import jax
import numpy as np

VARIANTS = {
    "baseline": {},
    "group_detr": {"model.num_query_groups": 3},
    "one_to_many": {"model.one_to_many_queries": 48, "loss.one_to_many_k": 4},
    "group_norm": {"model.backbone_norm": "group_norm"},
    "anchors": {"model.query_anchors": True},
    "group_o2m": {"model.num_query_groups": 3, "model.one_to_many_queries": 48,
                  "loss.one_to_many_k": 4},
    "denoising": {"model.query_anchors": True, "model.denoising_groups": 4},
    "refinement": {"model.query_anchors": True, "model.box_refinement": True},
}


def variant_config(path, overrides, variant):
  """The config file, then the overrides for every variant ("field=VALUE"), then the variant's."""
  from detr_jax import config_checks  # pylint: disable=g-import-not-at-top
  config = config_checks.load_config(path)
  config_checks.apply_overrides(config, overrides)
  for key, value in VARIANTS[variant].items():
    config_checks.set_field(config, key, value)
  return config


def train_for(config, minutes, evals, log):
  """Trains for `minutes` of train-step time; returns [(minutes, step, metrics)] at each eval."""
  from detr_jax import config_checks  # pylint: disable=g-import-not-at-top
  from detr_jax import evaluate  # pylint: disable=g-import-not-at-top
  from detr_jax import train  # pylint: disable=g-import-not-at-top
  from detr_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  config_checks.check_train_config(config)
  info = input_pipeline.dataset_info(config.dataset)
  config = train.resolve_config(config, info)
  mesh = train.create_mesh()
  total_steps = train.total_train_steps(config)
  model, tx, labels, schedules = train.build(config, mesh, total_steps)
  variables = train.init_variables(config, model, jax.random.PRNGKey(config.seed))
  state = train.create_train_state(config, model, tx, mesh, jax.random.PRNGKey(config.seed + 1),
                                   variables)
  step_fn = train.make_train_step(config, model, tx, labels, mesh, schedules)
  batches = input_pipeline.create_train_iterator(config)
  budget = minutes * 60.0
  marks = [budget * (i + 1) / evals for i in range(evals)]
  curve, seconds, step = [], 0.0, 0
  while marks and step < total_steps:
    batch = next(batches)
    start = time.perf_counter()
    state, metrics = step_fn(state, train.global_batch(batch, mesh))
    jax.block_until_ready(metrics["loss"])
    seconds += time.perf_counter() - start
    step += 1
    if seconds >= marks[0] or step == total_steps:
      marks.pop(0)
      scores = evaluate.evaluate_coco(config, model, {"params": state.params,
                                                      "batch_stats": state.batch_stats},
                                      mesh, info.class_names)
      curve.append((seconds / 60.0, step, scores))
      log(f"  {seconds / 60:.2f} min, step {step}, loss {float(metrics['loss']):.3f}: AP "
          f"{scores['AP']:.3f}, AP50 {scores['AP50']:.3f}")
  return curve


def _mean_curve(runs):
  """Evaluation i of every seed's run -> (mean minutes, mean, min, max of each metric)."""
  points = []
  for evals in zip(*runs.values()):  # runs stopped at total_steps may have fewer evaluations
    scores = {m: [e[2][m] for e in evals] for m in ("AP", "AP50", "AP75")}
    points.append((float(np.mean([e[0] for e in evals])),
                   {m: (float(np.mean(v)), min(v), max(v)) for m, v in scores.items()}))
  return points


def write_outputs(curves, output, title):
  """curves: {variant: {seed: [(minutes, step, scores)]}} -> PNG, markdown and JSON in output."""
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, "curves.json"), "w") as f:
    json.dump(curves, f, indent=1)
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  num_seeds = len(next(iter(curves.values())))
  for name, runs in curves.items():
    points = _mean_curve(runs)
    minutes = [p[0] for p in points]
    for ax, metric in zip(axes, ("AP", "AP50")):
      line, = ax.plot(minutes, [p[1][metric][0] for p in points], marker="o",
                      label=name if num_seeds == 1 else f"{name} (mean of {num_seeds} seeds)")
      if num_seeds > 1:
        ax.fill_between(minutes, [p[1][metric][1] for p in points],
                        [p[1][metric][2] for p in points], color=line.get_color(), alpha=0.2)
  for ax, metric in zip(axes, ("AP", "AP50")):
    ax.set_xlabel("training minutes")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(os.path.join(output, "convergence.png"), dpi=100)
  lines = ["| variant | seed | steps | minutes | AP | AP50 | AP75 | images with duplicates |",
           "|---|---|---|---|---|---|---|---|"]
  for name, runs in curves.items():
    for seed, curve in runs.items():
      for minutes, step, scores in curve:
        lines.append(f"| {name} | {seed} | {step} | {minutes:.2f} | {scores['AP']:.3f} | "
                     f"{scores['AP50']:.3f} | {scores['AP75']:.3f} | "
                     f"{scores['duplicate_images']:.0f} |")
  if num_seeds > 1:
    lines += ["", f"Final evaluation over {num_seeds} seeds, mean (min - max):", "",
              "| variant | minutes | AP | AP50 | AP75 |", "|---|---|---|---|---|"]
    for name, runs in curves.items():
      minutes, final = _mean_curve(runs)[-1]
      cells = " | ".join(f"{mean:.3f} ({low:.3f} - {high:.3f})"
                         for mean, low, high in (final[m] for m in ("AP", "AP50", "AP75")))
      lines.append(f"| {name} | {minutes:.2f} | {cells} |")
  table = "\n".join(lines) + "\n"
  with open(os.path.join(output, "convergence.md"), "w") as f:
    f.write(table)
  return table


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/shapes.py")
  parser.add_argument("--minutes", type=float, default=6.0, help="training budget per variant")
  parser.add_argument("--evals", type=int, default=4, help="evaluations per variant")
  parser.add_argument("--variants", default="baseline,group_detr,one_to_many,group_norm",
                      help=f"comma-separated, of {', '.join(VARIANTS)}")
  parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                      help="overrides for every variant, e.g. dataset.data_dir=DIR")
  parser.add_argument("--seeds", default="",
                      help="comma-separated config.seed values, one run of every variant each "
                           "(default: the config's seed)")
  parser.add_argument("--output", default="/tmp/convergence")
  args = parser.parse_args()
  names = [v for v in args.variants.split(",") if v]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown:
    parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    parser.error(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 0,1,2")
  if len(set(seeds)) != len(seeds):
    parser.error(f"--seeds {args.seeds!r} repeats a seed")
  curves = {}
  for name in names:
    print(f"{name}: {VARIANTS[name] or 'the config as it is'}", flush=True)
    curves[name] = {}
    for seed in seeds or [None]:
      config = variant_config(args.config, args.set, name)
      if seed is not None:
        config.seed = seed
        print(f" seed {seed}", flush=True)
      curves[name][int(config.seed)] = train_for(config, args.minutes, args.evals,
                                                 lambda s: print(s, flush=True))
  title = (f"{os.path.basename(args.config)}, {args.minutes:g} training minutes per variant, "
           f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
  print(write_outputs(curves, args.output, title))
  print(f"Wrote {args.output}/convergence.png, convergence.md and curves.json")


if __name__ == "__main__":
  main()
