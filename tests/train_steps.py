"""One real train step of a config on every (fake) device, on a random batch, for tests."""

import jax
import numpy as np

from detr_jax import train


def random_batch(config, seed: int = 0, boxes_per_image: int = 3) -> dict[str, np.ndarray]:
  """A train batch of config's shapes: random images, `boxes_per_image` random boxes each."""
  rng = np.random.default_rng(seed)
  b, m = config.batch_size, config.dataset.max_boxes
  height, width = config.dataset.buckets[0]
  return {"images": rng.normal(size=(b, height, width, 3)).astype(np.float32),
          "pixel_mask": np.ones((b, height, width), bool),
          "labels": rng.integers(0, config.model.num_classes, (b, m)).astype(np.int32),
          "boxes": np.concatenate([rng.uniform(0.3, 0.7, (b, m, 2)),
                                   rng.uniform(0.1, 0.3, (b, m, 2))], -1).astype(np.float32),
          "valid": np.arange(m)[None].repeat(b, 0) < boxes_per_image}


def one_step(config):
  """(initial variables, params before the step as numpy, params after, metrics)."""
  mesh = train.create_mesh(jax.devices())
  model, tx, labels, schedules = train.build(config, mesh, total_steps=10)
  variables = train.init_variables(config, model, jax.random.PRNGKey(0))
  state = train.create_train_state(config, model, tx, mesh, jax.random.PRNGKey(1), variables)
  step = train.make_train_step(config, model, tx, labels, mesh, schedules)
  before = jax.device_get(state.params)
  state, metrics = step(state, train.global_batch(random_batch(config), mesh))
  return variables, before, jax.device_get(state.params), jax.device_get(metrics)
