r"""Train-step speed: detr_jax against transformers' PyTorch DETR set up as the official recipe.

Both sides get the same images and targets and train the same parameters: the stem and layer1
frozen (`requires_grad=False` on the PyTorch side, `model.train_backbone_from`), AdamW with the
backbone at `lr_backbone`, global-norm clipping 0.1 (`clip_grad_norm_`), the official loss
weights and Hungarian matcher (transformers' `HungarianMatcher` / `ImageLoss`, host scipy
matching here), auxiliary losses on every decoder layer, dropout 0.1. The two steps run
interleaved in one process and the medians are compared, since the machine is noisy.

  PYTHONPATH=. python experiments/bench_train.py --batch 2 --size 512 --iters 5
  PYTHONPATH=. python experiments/bench_train.py --config configs/shapes_r18.py --iters 10
  PYTHONPATH=. python experiments/bench_train.py --conv_implementation xla   # before the 1x1 change
  PYTHONPATH=. python experiments/bench_train.py --conv_library xla_default  # YNNPACK convolutions
  PYTHONPATH=. python experiments/bench_train.py --config configs/shapes.py --iters 20 --jax_only

A model transformers' DETR cannot express (a backbone width other than 64, GroupNorm, query
groups, anchors, denoising or one-to-many queries) is refused unless `--jax_only`, which times
detr_jax alone: the step and the same parts.

Prints the median step times, images/s and the ratio (>1: detr_jax faster); the work of a step
(XLA's FLOP count of the step's program), each side's FLOP rate against this machine's float32
matrix-product peak (the fastest 2048^3 product through XLA, NumPy and, beside the PyTorch
side, PyTorch, timed in the same process), and the step time at that peak: a lower bound for
any step that does this work with direct convolutions and matrix products. Then a per-part table
for both sides: backbone forward, backbone forward + backward (trained stages), whole model
forward + backward (no loss), matching + loss (forward + gradient w.r.t. the outputs), optimizer
update (clipping + AdamW). Needs the `convert` extra (torch, transformers).
"""

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax import config_checks
from detr_jax import losses
from detr_jax import models
from detr_jax import tpu_plan
from detr_jax import train
from detr_jax.models import conv as conv_lib
from detr_jax.models import resnet


# Model fields whose non-official values transformers' DETR cannot express.
_TORCH_MODEL = {"backbone_width": 64, "backbone_norm": "frozen_bn", "num_query_groups": 1,
                "one_to_many_queries": 0, "query_anchors": False, "denoising_groups": 0,
                "backbone_stages": 4}


def make_config(args):
  config = config_checks.load_config(args.config)
  if args.config.endswith("detr_r50_coco.py"):
    config.model.backbone = args.backbone
    config.dataset.buckets = [(args.size, args.size)]
    config.batch_size = args.batch
  else:  # a demo config: its own image size, batch and backbone
    args.size = config.dataset.buckets[0][0]
    args.batch = config.batch_size
  if config.model.num_classes <= 0:
    config.model.num_classes = 6  # the shapes dataset
  config.model.conv_implementation = args.conv_implementation
  config.model.conv_library = args.conv_library
  config.steps_per_epoch = 1000
  return config


def make_batch(config, size, batch, seed=0):
  """Normalised random images and 2..6 random boxes per image (cxcywh in [0, 1])."""
  rng = np.random.default_rng(seed)
  m = config.dataset.max_boxes
  counts = rng.integers(2, 7, batch)
  valid = np.arange(m)[None] < counts[:, None]
  centers = rng.uniform(0.25, 0.75, (batch, m, 2))
  sizes = rng.uniform(0.05, 0.4, (batch, m, 2))
  return {
      "images": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
      "pixel_mask": np.ones((batch, size, size), bool),
      "labels": np.where(valid, rng.integers(1, config.model.num_classes, (batch, m)),
                         0).astype(np.int32),
      "boxes": np.where(valid[..., None], np.concatenate([centers, sizes], -1), 0).astype(
          np.float32),
      "valid": valid,
  }


def _median_seconds(fn, iters):
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak(torch=None, size=2048, repeats=5):
  """This machine's float32 matrix-product rate: GFLOP/s of the fastest of `repeats` products of
  two size x size matrices through XLA, NumPy and (given its module) PyTorch, by library."""
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((size, size), np.float32) for _ in range(2))
  xla_a, xla_b = jnp.asarray(a), jnp.asarray(b)
  xla_dot = jax.jit(jnp.dot)
  products = {"XLA": lambda: jax.block_until_ready(xla_dot(xla_a, xla_b)),
              "NumPy": lambda: a @ b}
  if torch is not None:
    torch_a, torch_b = torch.from_numpy(a), torch.from_numpy(b)
    products["PyTorch"] = lambda: torch.mm(torch_a, torch_b)
  rates = {}
  for name, product in products.items():
    product()  # compilation, thread start-up
    fastest = min(_median_seconds(product, 1) for _ in range(repeats))
    rates[name] = 2 * size ** 3 / fastest / 1e9
  return rates


def print_flop_rates(gflop, medians, peaks, images):
  """The FLOP rate of each side's step against this machine's matrix-product peak, and the
  step time that peak would allow (a lower bound: no step runs faster than its FLOPs at the
  rate of the best large matrix product)."""
  peak = max(peaks.values())
  print(f"work per step: {gflop:.1f} GFLOP (XLA's count for the detr_jax step"
        + ("; the PyTorch step runs the same model and loss)" if "pytorch" in medians else ")"))
  print(f"float32 matrix-product peak here: {peak:.0f} GFLOP/s (fastest 2048 x 2048 x 2048 "
        f"product: {', '.join(f'{k} {v:.0f}' for k, v in peaks.items())})")
  print("FLOP rate: " + ", ".join(
      f"{name} {gflop / seconds:.0f} GFLOP/s ({gflop / seconds / peak:.0%} of that peak)"
      for name, seconds in medians.items()))
  bound = gflop / peak
  against = "pytorch" if "pytorch" in medians else "detr_jax"
  print(f"a step at that peak would take {bound:.3f} s: at most "
        f"{medians[against] / bound:.2f}x the {against} images/s ({images / bound:.2f} images/s)")


# ------------------------------------------------------------------ detr_jax
class JaxSide:
  """The project's train step (`train.make_train_step`, 1-device mesh) and its parts."""

  def __init__(self, config, batch):
    self.config = config
    self.mesh = train.create_mesh(jax.devices()[:1])
    self.model, self.tx, self.labels, schedules = train.build(config, self.mesh, 10_000)
    variables = train.init_variables(config, self.model, jax.random.PRNGKey(0))
    self.state = train.create_train_state(config, self.model, self.tx, self.mesh,
                                          jax.random.PRNGKey(1), variables)
    self.step_fn = train.make_train_step(config, self.model, self.tx, self.labels, self.mesh,
                                         schedules)
    self.batch = train.global_batch(batch, self.mesh)
    # The work of one step: XLA's count of its floating-point operations (every multiply and add
    # of the convolutions and matrix products, and the elementwise operations).
    self.gflop = tpu_plan.program_flops(self.step_fn.lower(self.state, self.batch)) / 1e9
    self._parts()

  def step(self):
    self.state, metrics = self.step_fn(self.state, self.batch)
    jax.block_until_ready(metrics)

  def _parts(self):
    model_config, batch, labels = self.config.model, self.batch, self.labels
    backbone = resnet.ResNet(model_config.backbone, model_config.dilation,
                             conv_implementation=model_config.conv_implementation,
                             norm=model_config.backbone_norm, width=model_config.backbone_width,
                             norm_groups=model_config.group_norm_groups,
                             stages=model_config.get("backbone_stages", 4))
    # Copies: the train step donates (deletes) the state it is given.
    params, batch_stats, opt_state = jax.tree.map(
        jnp.copy, (self.state.params, self.state.batch_stats, self.state.opt_state))
    frozen = lambda p: models.stop_frozen_gradients(p, labels)  # noqa: E731
    # The compile options of the train step (model.conv_library) for every part.
    jit = functools.partial(jax.jit,
                            compiler_options=conv_lib.program_compiler_options(self.model,
                                                                               self.mesh))
    images, pixel_mask = batch["images"], batch["pixel_mask"]

    def backbone_fwd(params):
      return backbone.apply({"params": params["backbone"],
                             "batch_stats": batch_stats["backbone"]}, images)

    def backbone_loss(params):
      features = backbone_fwd(frozen(params))
      return jnp.sum(features * jnp.cos(features))

    def model_loss(params):
      out = self.model.apply({"params": frozen(params), "batch_stats": batch_stats}, images,
                             pixel_mask, train=True, rngs={"dropout": jax.random.key(0)})
      leaves = jax.tree.leaves(out)
      return sum(jnp.sum(x * jnp.cos(x)) for x in leaves)

    outputs = jit(lambda p: self.model.apply(
        {"params": p, "batch_stats": batch_stats}, images, pixel_mask, train=False))(params)
    targets = {k: batch[k] for k in ("labels", "boxes", "valid")}
    loss_config = self.config.loss

    def set_loss(outputs):
      return losses.set_loss(outputs, targets, loss_config)[0]

    grads = jit(jax.grad(model_loss))(params)

    def update(grads, opt_state, params):
      updates, opt_state = self.tx.update(grads, opt_state, params)
      return jax.tree.map(jnp.add, params, updates), opt_state

    jitted = {
        "backbone forward": (jit(backbone_fwd), (params,)),
        "backbone forward + backward": (jit(jax.grad(backbone_loss)), (params,)),
        "model forward + backward (no loss)": (jit(jax.grad(model_loss)), (params,)),
        "matching + loss (forward + grad)": (jit(jax.grad(set_loss)), (outputs,)),
        "optimizer update": (jit(update), (grads, opt_state, params)),
    }
    self.parts = {name: (lambda f=f, a=a: jax.block_until_ready(f(*a)))
                  for name, (f, a) in jitted.items()}


# ------------------------------------------------------------------ PyTorch
def _num(value):
  # transformers' strict config fields want an int where the value is integral (costs 1, 5, 2).
  return int(value) if float(value).is_integer() else float(value)


class TorchSide:
  """transformers' DetrForObjectDetection trained as the official recipe, and its parts."""

  def __init__(self, config, batch):
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import DetrConfig  # pylint: disable=g-import-not-at-top
    from transformers import DetrForObjectDetection  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.manual_seed(0)
    m = config.model
    block, depths = resnet.RESNET_ARCHS[m.backbone]
    backbone_config = dict(
        model_type="resnet", layer_type="bottleneck" if block == "bottleneck" else "basic",
        depths=list(depths),
        hidden_sizes=[256, 512, 1024, 2048] if block == "bottleneck" else [64, 128, 256, 512],
        out_features=["stage4"])
    loss = config.loss
    hf_config = DetrConfig(
        use_timm_backbone=False, backbone_config=backbone_config, dilation=bool(m.dilation),
        d_model=m.hidden_dim, encoder_attention_heads=m.num_heads,
        decoder_attention_heads=m.num_heads, encoder_layers=m.enc_layers,
        decoder_layers=m.dec_layers, encoder_ffn_dim=m.dim_feedforward,
        decoder_ffn_dim=m.dim_feedforward, num_queries=m.num_queries,
        num_labels=m.num_classes, dropout=m.dropout, attention_dropout=m.dropout,
        activation_dropout=m.dropout, auxiliary_loss=True, class_cost=_num(loss.cost_class),
        bbox_cost=_num(loss.cost_bbox), giou_cost=_num(loss.cost_giou),
        bbox_loss_coefficient=_num(loss.bbox_loss_coef),
        giou_loss_coefficient=_num(loss.giou_loss_coef), eos_coefficient=loss.eos_coef)
    self.model = DetrForObjectDetection(hf_config).train()
    # The official recipe's frozen stages (transformers' own rule matches no ResNet name of its
    # own backbone, so it is set here explicitly).
    frozen_stages = {"stem": 0, "layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}[
        m.train_backbone_from]
    backbone_params, other_params = [], []
    for name, param in self.model.named_parameters():
      if ".backbone." in name:
        stage = (0 if ".embedder." in name
                 else int(name.split(".stages.")[1].split(".")[0]) + 1)
        param.requires_grad_(stage >= frozen_stages)
        if param.requires_grad:
          backbone_params.append(param)
      else:
        other_params.append(param)
    opt = config.optimizer
    self.optimizer = torch.optim.AdamW(
        [{"params": other_params, "lr": opt.lr},
         {"params": backbone_params, "lr": opt.lr_backbone}], weight_decay=opt.weight_decay)
    self.trained = backbone_params + other_params
    self.clip = opt.clip_norm

    self.pixel_values = torch.from_numpy(batch["images"].transpose(0, 3, 1, 2).copy())
    self.pixel_mask = torch.from_numpy(batch["pixel_mask"].astype(np.int64))
    self.labels = [{"class_labels": torch.from_numpy(batch["labels"][i][batch["valid"][i]]).long(),
                    "boxes": torch.from_numpy(batch["boxes"][i][batch["valid"][i]])}
                   for i in range(len(batch["images"]))]
    self._parts()

  def step(self):
    out = self.model(pixel_values=self.pixel_values, pixel_mask=self.pixel_mask,
                     labels=self.labels)
    self.optimizer.zero_grad()
    out.loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.trained, self.clip)
    self.optimizer.step()

  def _parts(self):
    torch, model = self.torch, self.model
    backbone = model.model.backbone

    def backbone_fwd():
      with torch.no_grad():
        backbone(self.pixel_values, self.pixel_mask)

    def backbone_fwd_bwd():
      features = backbone(self.pixel_values, self.pixel_mask)[-1][0]
      (features * torch.cos(features)).sum().backward()

    def model_fwd_bwd():
      out = model(pixel_values=self.pixel_values, pixel_mask=self.pixel_mask)
      total = sum((x * torch.cos(x)).sum() for x in (out.logits, out.pred_boxes))
      total.backward()

    with torch.no_grad():
      out = model(pixel_values=self.pixel_values, pixel_mask=self.pixel_mask,
                  output_hidden_states=False)
      hidden = model.model(pixel_values=self.pixel_values,
                           pixel_mask=self.pixel_mask).intermediate_hidden_states
    logits0 = model.class_labels_classifier(hidden).detach()
    boxes0 = model.bbox_predictor(hidden).sigmoid().detach()

    def loss_fwd_bwd():
      logits = logits0.clone().requires_grad_(True)
      boxes = boxes0.clone().requires_grad_(True)
      loss, _, _ = model.loss_function(logits[-1], self.labels, logits.device, boxes[-1],
                                       model.config, logits, boxes)
      loss.backward()

    for p in self.trained:  # gradients for the optimizer part
      p.grad = torch.randn_like(p) * 1e-3

    def update():
      torch.nn.utils.clip_grad_norm_(self.trained, self.clip)
      self.optimizer.step()

    del out
    self.parts = {
        "backbone forward": backbone_fwd,
        "backbone forward + backward": backbone_fwd_bwd,
        "model forward + backward (no loss)": model_fwd_bwd,
        "matching + loss (forward + grad)": loss_fwd_bwd,
        "optimizer update": update,
    }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/detr_r50_coco.py",
                      help="configs/detr_r50_coco.py (with --size/--batch/--backbone) or a demo "
                           "config such as configs/shapes_r18.py (its own size, batch, backbone)")
  parser.add_argument("--size", type=int, default=512, help="square image size")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--backbone", default="resnet50", choices=sorted(resnet.RESNET_ARCHS))
  parser.add_argument("--iters", type=int, default=5, help="timed steps per side (medians)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--conv_implementation", default="auto", choices=("auto", "xla", "dot"))
  parser.add_argument("--conv_library", default="auto", choices=("auto", "eigen", "xla_default"))
  parser.add_argument("--no_parts", action="store_true", help="only the whole train step")
  parser.add_argument("--jax_only", action="store_true",
                      help="time detr_jax alone (needed for a model PyTorch DETR does not have, "
                           "such as configs/shapes.py's width-16 backbone)")
  args = parser.parse_args()

  config = make_config(args)
  unlike_torch = [f"model.{k}={config.model[k]!r}" for k, official in _TORCH_MODEL.items()
                  if config.model.get(k, official) != official]
  if unlike_torch and not args.jax_only:
    parser.error(f"{args.config} has {', '.join(unlike_torch)}: transformers' DETR has no such "
                 "model to compare with; pass --jax_only to time detr_jax alone.")
  batch = make_batch(config, args.size, args.batch)
  print(f"{args.config}: {config.model.backbone}, batch {args.batch} x {args.size} x {args.size}, "
        f"float32, conv_implementation={args.conv_implementation}, "
        f"conv_library={args.conv_library}, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, {os.cpu_count()} CPU threads")
  sides = {"detr_jax": JaxSide(config, batch)}
  if not args.jax_only:
    sides["pytorch"] = TorchSide(config, batch)

  for side in sides.values():
    for _ in range(args.warmup):  # compilation, allocator warm-up
      side.step()
  times = {name: [] for name in sides}
  for _ in range(args.iters):  # interleaved: both sides see the same machine load
    for name, side in sides.items():
      times[name].append(_median_seconds(side.step, 1))
  medians = {name: statistics.median(t) for name, t in times.items()}
  for name, seconds in medians.items():
    print(f"train step {name:9s} median {seconds:.3f} s  ({args.batch / seconds:.2f} images/s)")
  if "pytorch" in medians:
    print(f"ratio detr_jax / pytorch images/s: "
          f"{medians['pytorch'] / medians['detr_jax']:.2f}x")
  peaks = matmul_peak(sides["pytorch"].torch if "pytorch" in sides else None)
  print_flop_rates(sides["detr_jax"].gflop, medians, peaks, args.batch)

  if args.no_parts:
    return
  if args.jax_only:
    print(f"\n| part (median of {args.iters}) | detr_jax |\n|---|---|")
    for part, fn in sides["detr_jax"].parts.items():
      fn()  # compilation
      print(f"| {part} | {_median_seconds(fn, args.iters) * 1e3:.0f} ms |")
    return
  print(f"\n| part (median of {args.iters}) | detr_jax | PyTorch | ratio |\n|---|---|---|---|")
  for part in sides["detr_jax"].parts:
    for side in sides.values():
      side.parts[part]()  # warm-up / compilation
    part_times = {name: [] for name in sides}
    for _ in range(args.iters):
      for name, side in sides.items():
        part_times[name].append(_median_seconds(side.parts[part], 1))
    j, t = (statistics.median(part_times[n]) for n in ("detr_jax", "pytorch"))
    print(f"| {part} | {j * 1e3:.0f} ms | {t * 1e3:.0f} ms | {t / j:.2f}x |")


if __name__ == "__main__":
  main()
