r"""Cost of Hungarian matching and of the DETR set loss, alone and inside a small train step.

Shapes of the official recipe per device: batch 8, 100 queries, 6 decoder outputs (final + 5 aux),
91 classes, targets padded to 50 slots with a random count of 1..50 real boxes per image. Times
(median ms per call of a jitted function, after compilation):

  cost            the [6, 8, 100, 50] matching cost alone (what every matcher pays)
  host            cost + scipy linear_sum_assignment in one pure_callback (the default matcher)
  device          cost + optax.assignment.hungarian_algorithm on the device
  greedy          cost + greedy matching (not optimal, for comparison)
  loss host/dev   the whole set_loss, forward + gradient wrt the outputs
  step host/dev   a small DETR train step (detr_jax.models.build_model: ResNet-18 at width 32,
                  2 + 6 layers, 100 queries, 128x128 images) with AdamW, matching inside

and ratios against the host matcher and the train step measured in the same run. Timings on a
shared machine are noisy: compare ratios.

Command:
  python experiments/bench_matching.py [--repeats 5] [--image_size 128]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import tiny_test
from detr_jax import losses
from detr_jax import matching

BATCH, QUERIES, LAYERS, SLOTS, NUM_CLASSES = 8, 100, 6, 50, 91


def random_problem(seed=0):
  """Random decoder outputs [L, B, Q, ...] and padded targets with 1..SLOTS boxes per image."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(LAYERS, BATCH, QUERIES, NUM_CLASSES + 1)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.1, 0.9, size=(LAYERS, BATCH, QUERIES, 2)),
                          rng.uniform(0.02, 0.4, size=(LAYERS, BATCH, QUERIES, 2))], -1)
  counts = rng.integers(1, SLOTS + 1, size=BATCH)
  valid = np.arange(SLOTS)[None, :] < counts[:, None]
  targets = {
      "labels": rng.integers(1, NUM_CLASSES, size=(BATCH, SLOTS)).astype(np.int32),
      "boxes": np.concatenate([rng.uniform(0.1, 0.9, size=(BATCH, SLOTS, 2)),
                               rng.uniform(0.02, 0.4, size=(BATCH, SLOTS, 2))],
                              -1).astype(np.float32),
      "valid": valid,
  }
  return jnp.asarray(logits), jnp.asarray(boxes.astype(np.float32)), targets, counts


def time_ms(fn, *args, repeats):
  """Median wall time in ms of fn(*args) after one compiling call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return float(np.median(times))


def loss_config(matcher):
  config = tiny_test.get_config().loss
  config.matcher = matcher
  return config


def small_train_step(matcher, image_size):
  """(jitted step, state, batch) of a small DETR with the benchmark's loss shapes."""
  from detr_jax.models import build_model  # pylint: disable=g-import-not-at-top
  config = tiny_test.get_config()
  config.model.num_queries = QUERIES
  config.model.dec_layers = LAYERS
  config.model.num_classes = NUM_CLASSES
  model = build_model(config.model)
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(BATCH, image_size, image_size, 3)), jnp.float32)
  pixel_mask = jnp.ones((BATCH, image_size, image_size), bool)
  variables = model.init(jax.random.key(0), images, pixel_mask, train=False)
  _, _, targets, _ = random_problem()
  optimizer = optax.adamw(1e-4, weight_decay=1e-4)
  params = variables["params"]
  state = (params, optimizer.init(params))
  config_loss = loss_config(matcher)

  @jax.jit
  def step(state, images, pixel_mask, targets):
    params, opt_state = state

    def loss_fn(params):
      outputs = model.apply({**variables, "params": params}, images, pixel_mask, train=False)
      return losses.set_loss(outputs, targets, config_loss)[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return step, state, (images, pixel_mask, targets)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--image_size", type=int, default=128)
  args = parser.parse_args()

  logits, boxes, targets, counts = random_problem()
  print(f"devices: {jax.devices()}")
  print(f"batch {BATCH}, queries {QUERIES}, decoder outputs {LAYERS}, slots {SLOTS}, "
        f"targets per image {counts.tolist()}")
  config = loss_config("hungarian_host")
  results = {}
  cost_fn = jax.jit(lambda l, b: matching.matching_cost(
      l, b, targets["labels"][None], targets["boxes"][None], config))
  results["cost"] = time_ms(cost_fn, logits, boxes, repeats=args.repeats)
  for matcher in ("hungarian_host", "hungarian_device", "greedy"):
    config = loss_config(matcher)
    match_fn = jax.jit(lambda l, b, config=config: matching.match(l, b, targets, config))
    results[matcher] = time_ms(match_fn, logits, boxes, repeats=args.repeats)

  outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
             "aux_outputs": [{"pred_logits": l, "pred_boxes": b}
                             for l, b in zip(logits[:-1], boxes[:-1])]}
  for matcher in ("hungarian_host", "hungarian_device"):
    config = loss_config(matcher)
    grad_fn = jax.jit(jax.value_and_grad(
        lambda o, config=config: losses.set_loss(o, targets, config)[0]))
    results[f"loss {matcher}"] = time_ms(grad_fn, outputs, repeats=args.repeats)
  for matcher in ("hungarian_host", "hungarian_device"):
    step, state, batch = small_train_step(matcher, args.image_size)
    results[f"step {matcher}"] = time_ms(step, state, *batch, repeats=args.repeats)

  host, step = results["hungarian_host"], results["step hungarian_host"]
  print(f"{'what':28s} {'ms':>9s} {'x host matching':>16s} {'share of host step':>19s}")
  for name, ms in results.items():
    print(f"{name:28s} {ms:9.2f} {ms / host:16.2f} {ms / step:19.1%}")
  print(f"device/host matching: {results['hungarian_device'] / host:.2f}x; "
        f"step with device matching / step with host matching: "
        f"{results['step hungarian_device'] / step:.2f}x")


if __name__ == "__main__":
  main()
