"""Bad configs fail at start, in one line naming the field and the fix, before anything compiles.

Each case runs `python -m detr_jax.main` as a user types it (a subprocess from a scratch
directory) and checks: exit status 2, one `error:` line on stderr naming the field, no traceback,
and no training output in the workdir. The checks themselves (detr_jax/config_checks.py) are also
tested directly, so removing one fails both.
"""

import os
import pathlib
import subprocess
import sys
import time

import pytest

from configs import tiny_test
from detr_jax import config_checks

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny_test.py")


def _env(devices: int = 1) -> dict[str, str]:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  return env


def _train(tmp_path, *args, config=TINY, workdir=None, devices=1):
  workdir = workdir or str(tmp_path / "workdir")
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, "-m", "detr_jax.main", f"--config={config}", f"--workdir={workdir}",
       f"--config.dataset.data_dir={tmp_path / 'tfds'}", *args],
      cwd=tmp_path, capture_output=True, text=True, env=_env(devices), timeout=300, check=False)
  return result, time.monotonic() - start


def _assert_one_line_error(result, *words):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  for word in words:
    assert word in errors[0], errors[0]
  return errors[0]


def test_misspelled_override_names_the_field_and_the_fix(tmp_path):
  result, _ = _train(tmp_path, "--config.model.num_querys=20")
  _assert_one_line_error(result, "model.num_querys", "config.model.num_queries")
  assert not (tmp_path / "workdir").exists()


def test_misspelled_field_in_a_config_file(tmp_path):
  config = tmp_path / "my_config.py"
  config.write_text("from configs import tiny_test\n"
                    "def get_config():\n"
                    "  config = tiny_test.get_config()\n"
                    "  config.optimizer.weight_decy = 1e-3\n"
                    "  return config\n")
  result, _ = _train(tmp_path, config=str(config))
  _assert_one_line_error(result, "config.optimizer.weight_decy", "config.optimizer.weight_decay")
  assert not (tmp_path / "workdir" / "checkpoints").exists()


def test_batch_size_must_divide_over_the_devices(tmp_path):
  result, _ = _train(tmp_path, "--config.batch_size=6", devices=4)
  _assert_one_line_error(result, "config.batch_size=6", "4 devices", "--config.batch_size=4")


def test_buckets_must_hold_max_size_images(tmp_path):
  result, _ = _train(tmp_path, "--config.dataset.buckets=((48,48),)")
  _assert_one_line_error(result, "config.dataset.buckets", "config.dataset.max_size=64",
                         "(64, 64)")


def test_num_queries_smaller_than_max_boxes(tmp_path):
  result, _ = _train(tmp_path, "--config.model.num_queries=4")
  _assert_one_line_error(result, "config.model.num_queries=4", "config.dataset.max_boxes=8")


def test_init_from_that_does_not_exist(tmp_path):
  result, _ = _train(tmp_path, f"--config.init_from={tmp_path / 'no_such_model'}")
  _assert_one_line_error(result, "config.init_from", "does not exist")


def test_workdir_that_is_not_writable(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  result, _ = _train(tmp_path, workdir=str(blocker / "workdir"))
  _assert_one_line_error(result, "--workdir", "not a writable directory")


def test_override_of_the_wrong_type(tmp_path):
  result, _ = _train(tmp_path, "--config.batch_size=eight")
  _assert_one_line_error(result, "batch_size")


def test_a_good_config_passes_every_check(tmp_path):
  config = tiny_test.get_config()
  config_checks.check_train_config(config, str(tmp_path / "w"), num_devices=8)
  config_checks.check_eval_config(config, num_devices=8)


@pytest.mark.parametrize("mutate, field", [
    (lambda c: setattr(c.dataset, "scale", (64,)), "dataset.scale"),
    (lambda c: setattr(c, "batch_size", 12), "batch_size"),
    (lambda c: setattr(c, "eval_batch_size", 0), "eval_batch_size"),
    (lambda c: setattr(c.dataset, "buckets", ((64, 32),)), "dataset.buckets"),
    (lambda c: setattr(c.dataset, "buckets", ()), "dataset.buckets"),
    (lambda c: setattr(c.model, "num_queries", 7), "model.num_queries"),
    (lambda c: setattr(c.optimizer, "grad_accum_steps", 0), "optimizer.grad_accum_steps"),
    (lambda c: setattr(c.optimizer, "schedule", "cosine_decay"), "optimizer.schedule"),
    (lambda c: setattr(c.optimizer, "b2", 1.0), "optimizer.b2"),
    (lambda c: setattr(c.loss, "cost_query_order", float("nan")), "loss.cost_query_order"),
    (lambda c: setattr(c, "backbone_init", "/no/such/resnet.pth"), "backbone_init"),
    (lambda c: setattr(c.dataset, "cache_train_resized", True), "dataset.cache_train_resized"),
])
def test_each_check_names_its_field(mutate, field, tmp_path):
  config = tiny_test.get_config()
  mutate(config)
  with pytest.raises(config_checks.ConfigError, match=f"config.{field}"):
    config_checks.check_train_config(config, str(tmp_path / "w"), num_devices=8)


def test_eval_checks_ignore_the_training_size():
  config = tiny_test.get_config()
  config.dataset.max_size = 999  # training only: evaluation resizes to eval_max_size
  config_checks.check_eval_config(config, num_devices=8)
  config.dataset.eval_max_size = 96
  with pytest.raises(config_checks.ConfigError, match="eval_max_size=96"):
    config_checks.check_eval_config(config, num_devices=8)


def test_evaluate_refuses_a_missing_checkpoint(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "detr_jax.evaluate", f"--config={TINY}",
       f"--checkpoint={tmp_path / 'no_such_run'}"],
      cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=300, check=False)
  _assert_one_line_error(result, "--checkpoint", "does not exist")
