"""Tests of detr_jax.train: data parallelism, learning, exact resume, pretrained init.

Runs the tiny config (configs/tiny_test.py) on the 8 fake CPU devices of tests/conftest.py.
"""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_test
from detr_jax import checkpointing
from detr_jax import train

NUM_BOXES = 3


def _synthetic_batch(config, seed):
  """A train batch with the input pipeline's train keys; every image has NUM_BOXES boxes.

  Equal box counts make the official per-device mean of loss_ce equal to the global-batch mean,
  so 8 devices and 1 device must agree.
  """
  rng = np.random.default_rng(seed)
  b, m = config.batch_size, config.dataset.max_boxes
  height, width = config.dataset.buckets[0]
  centers = rng.uniform(0.25, 0.75, size=(b, m, 2))
  sizes = rng.uniform(0.1, 0.4, size=(b, m, 2))
  valid = np.arange(m)[None, :] < NUM_BOXES
  return {
      "images": rng.normal(size=(b, height, width, 3)).astype(np.float32),
      "pixel_mask": np.ones((b, height, width), bool),
      "labels": np.where(valid, rng.integers(0, config.model.num_classes, (b, m)), 0).astype(
          np.int32),
      "boxes": np.where(valid[..., None], np.concatenate([centers, sizes], -1), 0).astype(
          np.float32),
      "valid": np.broadcast_to(valid, (b, m)).copy(),
  }


def _setup(config, devices):
  mesh = train.create_mesh(devices)
  model, tx, labels, schedules = train.build(config, mesh, total_steps=100)
  variables = train.init_variables(config, model, jax.random.PRNGKey(0))
  state = train.create_train_state(config, model, tx, mesh, jax.random.PRNGKey(1), variables)
  step_fn = train.make_train_step(config, model, tx, labels, mesh, schedules)
  return mesh, state, step_fn


def _run(mesh, state, step_fn, batches):
  state = jax.tree.map(lambda x: x.copy(), state)  # the step donates its input state
  history = []
  for batch in batches:
    state, metrics = step_fn(state, train.global_batch(batch, mesh))
    history.append(jax.device_get(metrics))
  return state, history


@pytest.fixture(scope="module")
def tiny_config():
  config = tiny_test.get_config()
  config.steps_per_epoch = 8
  return config


@pytest.fixture(scope="module")
def one_device(tiny_config):
  return _setup(tiny_config, jax.devices()[:1])


def test_eight_devices_match_one_device(tiny_config, one_device):
  assert jax.device_count() == 8, "tests/conftest.py should provide 8 CPU devices"
  batches = [_synthetic_batch(tiny_config, seed) for seed in range(2)]
  state_1, history_1 = _run(*one_device, batches)
  state_8, history_8 = _run(*_setup(tiny_config, jax.devices()), batches)
  for m1, m8 in zip(history_1, history_8):
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "grad_norm"):
      np.testing.assert_allclose(m8[key], m1[key], rtol=2e-4, err_msg=key)
  assert int(state_8.step) == int(state_1.step) == 2
  params_1, params_8 = jax.device_get((state_1.params, state_8.params))
  # Adam divides each gradient by its own magnitude, so an element whose gradient is near zero
  # turns a summation-order difference (8 partial sums vs 1) into a visible step difference.
  # Nearly every element must agree to round-off; none may differ by more than 1% of the step
  # size (lr) per step.
  max_step_gap = 0.01 * tiny_config.optimizer.lr * 2
  def check(path, a, b):
    name = jax.tree_util.keystr(path)
    gap = np.abs(a - b)
    assert gap.max() <= max_step_gap, f"{name}: max gap {gap.max():.3g} > {max_step_gap:.3g}"
    loose = np.mean(gap > 1e-3 * np.abs(b) + 2e-6)
    assert loose <= 1e-3, f"{name}: {loose:.2%} of the elements differ beyond round-off"
  jax.tree_util.tree_map_with_path(check, params_8, params_1)
  # The steps really updated the parameters.
  initial = jax.device_get(one_device[1].params)
  assert not np.allclose(params_8["class_embed"]["kernel"], initial["class_embed"]["kernel"])


def test_cpu_train_step_neither_donates_nor_copies_its_state(tiny_config, one_device):
  """On the CPU the state is not donated, so XLA copies no AdamW moment before updating it."""
  mesh, state, step_fn = one_device
  batch = train.global_batch(_synthetic_batch(tiny_config, 0), mesh)
  hlo = step_fn.lower(state, batch).compile().as_text()
  assert "input_output_alias" not in hlo.splitlines()[0]
  copies = [line for line in hlo.splitlines() if "copy(%state_opt_state" in line]
  assert not copies, f"{len(copies)} copies of the optimizer state, e.g. {copies[0][:200]}"
  # A donated step of the same state aliases it to the outputs (the accelerator setting).
  donated = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=(0,))
  assert "input_output_alias" in donated.lower(state).compile().as_text().splitlines()[0]


def test_a_second_run_of_the_same_program_reuses_the_train_step(tiny_config):
  mesh = train.create_mesh(jax.devices()[:1])
  first = train.build_train_step(tiny_config, mesh, 100)
  other_seed = tiny_config.copy_and_resolve_references()
  other_seed.seed += 1
  other_seed.eval_every_steps = 1
  assert train.build_train_step(other_seed, mesh, 100)[4] is first[4]
  other_lr = tiny_config.copy_and_resolve_references()
  other_lr.optimizer.lr *= 2
  assert train.build_train_step(other_lr, mesh, 100)[4] is not first[4]
  assert train.build_train_step(tiny_config, mesh, 101)[4] is not first[4]
  assert train.build_train_step(tiny_config, train.create_mesh(jax.devices()), 100)[4] is not (
      first[4])
  # The most recent few are kept: the first is gone after enough other programs.
  for lr in range(train._MAX_BUILT_STEPS):  # pylint: disable=protected-access
    config = tiny_config.copy_and_resolve_references()
    config.optimizer.lr = 1e-5 * (lr + 1)
    train.build_train_step(config, mesh, 100)
  assert train.build_train_step(tiny_config, mesh, 100)[4] is not first[4]


def test_overfits_one_batch(tiny_config, one_device):
  mesh, state, step_fn = one_device
  batch = _synthetic_batch(tiny_config, seed=7)
  for key in ("images", "labels", "boxes"):  # one image and its boxes, 8 times
    batch[key] = np.broadcast_to(batch[key][:1], batch[key].shape).copy()
  _, history = _run(mesh, state, step_fn, [batch] * 60)
  first, last = history[0]["loss"], np.mean([h["loss"] for h in history[-3:]])
  assert last < first / 3, f"loss {first:.3f} -> {last:.3f}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _shapes_config(data_dir, num_train_steps, eval_every_steps=-1):
  config = tiny_test.get_config()
  config.dataset.data_dir = data_dir
  config.num_train_steps = num_train_steps
  config.checkpoint_every_steps = 2
  config.eval_every_steps = eval_every_steps
  return config


def test_resume_after_sigterm_is_exact(data_dir, tmp_path, monkeypatch):
  total = 4
  straight = train.train_and_evaluate(_shapes_config(data_dir, total, eval_every_steps=total),
                                      str(tmp_path / "straight"))
  metrics = json.load(open(tmp_path / "straight" / "eval_metrics.json"))
  assert metrics["step"] == total and 0.0 <= metrics["AP50"] <= 1.0
  assert os.path.exists(tmp_path / "straight" / "config.json")
  # `python -m detr_jax.evaluate --checkpoint WORKDIR` restores the same weights.
  from detr_jax import evaluate  # pylint: disable=g-import-not-at-top
  again = evaluate.run(_shapes_config(data_dir, total), str(tmp_path / "straight"))
  for name in evaluate.METRIC_NAMES:
    assert again[name] == pytest.approx(metrics[name], abs=1e-6), name

  # Preempt the second run after step 2 with a real SIGTERM, then resume it.
  real_should_stop = checkpointing.PreemptionFlag.should_stop

  def sigterm_at_step_2(self, step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_should_stop(self, step)

  monkeypatch.setattr(checkpointing.PreemptionFlag, "should_stop", sigterm_at_step_2)
  workdir = str(tmp_path / "resumed")
  stopped = train.train_and_evaluate(_shapes_config(data_dir, total), workdir)
  assert int(stopped.step) == 2
  monkeypatch.setattr(checkpointing.PreemptionFlag, "should_stop", real_should_stop)
  assert checkpointing.create_checkpoint_manager(workdir, read_only=True).latest_step() == 2
  resumed = train.train_and_evaluate(_shapes_config(data_dir, total), workdir)

  assert int(resumed.step) == total
  straight, resumed = jax.device_get((straight, resumed))
  assert jax.tree.structure(straight) == jax.tree.structure(resumed)
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  # The run really trained: Adam's step counters and parameters moved.
  assert not np.array_equal(straight.params["class_embed"]["kernel"],
                            stopped.params["class_embed"]["kernel"])


def test_init_from_other_num_classes_reinitialises_class_head(tmp_path):
  from detr_jax import convert  # pylint: disable=g-import-not-at-top
  from detr_jax import models  # pylint: disable=g-import-not-at-top
  source_config = tiny_test.get_config()
  pretrained = train.init_variables(
      source_config, models.build_model(source_config.model), jax.random.PRNGKey(3))
  convert.save_variables(pretrained, str(tmp_path / "converted"))

  config = tiny_test.get_config()
  config.model.num_classes = source_config.model.num_classes + 3
  model = models.build_model(config.model)
  fresh = train.init_variables(config, model, jax.random.PRNGKey(4))
  config.init_from = str(tmp_path / "converted")
  loaded = train.init_variables(config, model, jax.random.PRNGKey(4))

  flat = lambda t: jax.tree_util.tree_flatten_with_path(jax.device_get(t))[0]
  pretrained_flat = dict(flat(pretrained))
  fresh_flat = dict(flat(fresh))
  for path, value in flat(loaded):
    name = jax.tree_util.keystr(path)
    if "class_embed" in name:
      np.testing.assert_array_equal(value, fresh_flat[path], err_msg=name)
      assert value.shape[-1] == config.model.num_classes + 1
    else:
      np.testing.assert_array_equal(value, pretrained_flat[path], err_msg=name)
  assert not np.array_equal(fresh["params"]["bbox_embed"]["layers_0"]["kernel"],
                            loaded["params"]["bbox_embed"]["layers_0"]["kernel"])


def test_merge_pretrained_rejects_other_model():
  fresh = {"backbone": {"conv1": {"kernel": jnp.zeros((3, 3, 3, 8))}}, "class_embed": {}}
  with pytest.raises(ValueError, match="shape"):
    checkpointing.merge_pretrained(
        fresh, {"backbone": {"conv1": {"kernel": np.zeros((3, 3, 3, 4))}}})
  with pytest.raises(ValueError, match="does not have"):
    checkpointing.merge_pretrained(fresh, {"transformer": {"x": np.zeros(2)}})


def test_batch_size_must_divide_devices(tiny_config):
  config = tiny_test.get_config()
  config.batch_size = 6
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    train.check_batch_sizes(config, train.create_mesh())


def test_backbone_init_loads_torchvision_resnet(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  from detr_jax import convert  # pylint: disable=g-import-not-at-top
  from detr_jax import models  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  resnet18 = torch_reference.TorchvisionResNet(torch_reference.BasicBlock, (2, 2, 2, 2))
  path = str(tmp_path / "resnet18.pth")
  torch.save(resnet18.state_dict(), path)

  config = tiny_test.get_config()
  model = models.build_model(config.model)
  fresh = train.init_variables(config, model, jax.random.PRNGKey(5))
  config.backbone_init = path
  loaded = train.init_variables(config, model, jax.random.PRNGKey(5))
  expected = convert.backbone_from_torchvision(
      torch_reference.numpy_state_dict(resnet18), config.model)

  for col in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded[col]["backbone"]),
                 jax.device_get(expected[col]["backbone"]))
  np.testing.assert_array_equal(loaded["params"]["class_embed"]["kernel"],
                                fresh["params"]["class_embed"]["kernel"])
  assert not np.array_equal(loaded["params"]["backbone"]["conv1"]["kernel"],
                            fresh["params"]["backbone"]["conv1"]["kernel"])


def test_nonfinite_step_is_skipped_on_the_device(tiny_config, one_device):
  mesh, state, step_fn = one_device
  state = jax.tree.map(lambda x: x.copy(), state)
  before = jax.device_get(state)
  bad = _synthetic_batch(tiny_config, seed=11)
  bad["images"][0, 0, 0, 0] = np.nan  # one pixel: the loss and every gradient become NaN
  state, metrics = step_fn(state, train.global_batch(bad, mesh))
  metrics, after = jax.device_get((metrics, state))
  assert metrics["nonfinite"] == 1.0 and not np.isfinite(metrics["loss"])
  assert int(after.step) == int(before.step) + 1  # the data moves on
  jax.tree.map(np.testing.assert_array_equal, (after.params, after.opt_state),
               (before.params, before.opt_state))
  state, metrics = step_fn(state, train.global_batch(_synthetic_batch(tiny_config, 12), mesh))
  metrics, good = jax.device_get((metrics, state))
  assert metrics["nonfinite"] == 0.0 and np.isfinite(metrics["loss"])
  assert not np.array_equal(good.params["class_embed"]["kernel"],
                            before.params["class_embed"]["kernel"])


def test_nonfinite_monitor_counts_streaks_across_log_windows():
  monitor = train.NonFiniteMonitor(max_consecutive=3)
  assert monitor.update([(1, 0.0), (2, 1.0), (3, 1.0)]) == [2, 3]
  assert monitor.streak == 2 and not monitor.exceeded
  assert monitor.update([(4, 0.0), (5, 1.0)]) == [5]  # a finite step resets the streak
  assert monitor.streak == 1 and monitor.total == 3
  monitor.update([(6, 1.0), (7, 1.0)])
  assert monitor.exceeded and monitor.streak_start == 5
  assert not train.NonFiniteMonitor(0).exceeded


def test_training_stops_after_too_many_nonfinite_steps(data_dir, tmp_path, monkeypatch):
  from detr_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  real_iterator = input_pipeline.create_train_iterator

  def nan_from_step_3(config, start_step=0):
    for step, batch in enumerate(real_iterator(config, start_step=start_step), start_step + 1):
      if step >= 3:
        batch = dict(batch, images=np.full_like(batch["images"], np.nan))
      yield batch

  monkeypatch.setattr(input_pipeline, "create_train_iterator", nan_from_step_3)
  config = _shapes_config(data_dir, num_train_steps=8)
  config.log_every_steps = 1
  config.max_nonfinite_steps = 2
  workdir = tmp_path / "nan"
  with pytest.raises(train.NonFiniteError,
                     match=r"2 consecutive train steps \(steps 3\.\.4\).*max_nonfinite_steps=2"
                           r".*last checkpoint, step 2 in .*checkpoints, is kept"):
    train.train_and_evaluate(config, str(workdir))
  # It stopped at the first log after the second NaN step, before saving step 4.
  manager = checkpointing.create_checkpoint_manager(str(workdir), read_only=True)
  assert manager.latest_step() == 2
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  kept = manager.restore(2, args=ocp.args.StandardRestore())
  assert int(kept["step"]) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(kept["params"]))


def _damage(step_dir):
  """Truncates every data file of an orbax step directory to half its size."""
  damaged = 0
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      if size > 0 and name != "_CHECKPOINT_METADATA":
        with open(path, "r+b") as f:
          f.truncate(size // 2)
        damaged += 1
  assert damaged > 0


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  manager = checkpointing.create_checkpoint_manager(str(tmp_path), keep=3)
  states = {s: {"step": jnp.asarray(s), "w": jnp.full((64, 64), float(s))} for s in (1, 2, 3)}
  for s, state in states.items():
    checkpointing.save(manager, s, state, force=True)
  manager.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), states[1])
  _damage(os.path.join(manager.directory, "3"))
  reopened = checkpointing.create_checkpoint_manager(str(tmp_path), keep=3)
  with caplog.at_level("WARNING"):
    state = checkpointing.restore_latest_readable(reopened, abstract)
  assert int(state["step"]) == 2
  np.testing.assert_array_equal(state["w"], states[2]["w"])
  assert "step 2 instead of the newest, step 3" in caplog.text
  for s in (1, 2):
    _damage(os.path.join(manager.directory, str(s)))
  with pytest.raises(checkpointing.NoReadableCheckpointError,
                     match=r"No checkpoint in .* can be read: step 3: .*step 2: .*step 1: "):
    checkpointing.restore_latest_readable(
        checkpointing.create_checkpoint_manager(str(tmp_path), keep=3), abstract)
