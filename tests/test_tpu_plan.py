"""detr_jax.tpu_plan: the real train and eval steps compiled for a TPU slice, on this CPU.

Needs the `tpu` extra (libtpu); skipped, saying so, where it is not installed.
"""

import importlib.util
import math
import os
import warnings

import jax
import pytest

from configs import tiny_test
from detr_jax import tpu_plan

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e \".[tpu]\"); TPU compilation needs it")


def test_tiny_train_and_eval_steps_compile_for_v5e_2x2():
  config = tiny_test.get_config()
  plan = tpu_plan.plan(config, "v5e:2x2")
  assert plan.num_chips == 4 and plan.chip == "v5e"
  assert [s.program for s in plan.steps] == ["train", "eval"]
  train_step, eval_step = plan.steps
  assert train_step.per_chip_batch == config.batch_size // 4
  assert eval_step.per_chip_batch == config.eval_batch_size // 4
  for step in plan.steps:
    assert step.bucket == (64, 64)
    assert step.argument_bytes > 0 and step.flops > 0
    assert step.fits
    assert 0 < step.total_bytes < tpu_plan.CHIPS["v5e"]["hbm_bytes"]
  # The train step holds the parameters and two Adam moments; eval only the variables.
  assert train_step.argument_bytes > 2 * eval_step.argument_bytes
  # Backward pass: a train step costs more than twice the forward FLOPs per image.
  assert (train_step.flops / train_step.per_chip_batch
          > 2 * eval_step.flops / eval_step.per_chip_batch)
  table = tpu_plan.format_plan(plan, config, mfu=0.4)
  assert "| train | 64x64 | 2 |" in table and "Everything fits." in table

  # The same program again, with JAX's persistent compilation cache on (tests/conftest.py sets
  # JAX_COMPILATION_CACHE_DIR): a program for compile-only TPU devices cannot be read back from
  # it without a TPU (JAX warns and compiles again), so it is never written there.
  assert os.environ.get("JAX_COMPILATION_CACHE_DIR") and jax.config.jax_enable_compilation_cache
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message=".*persistent compilation cache.*")
    again = tpu_plan.plan(config, "v5e:2x2", programs=("eval",))
  assert again.steps[0].flops == eval_step.flops
  assert jax.config.jax_enable_compilation_cache  # on again for the other programs


def test_a_bucket_too_large_for_one_image_does_not_fit(monkeypatch):
  # A program that fits takes the TPU compiler minutes at this size (96 s for one 3584 x 3584
  # image per chip); a refusal takes seconds. So the real compiler is asked only for refusals
  # here, and the search for the largest batch that fits is checked below with a stand-in.
  config = tiny_test.get_config()
  config.dataset.buckets = [(5120, 5120)]  # one image of 5120 x 5120 per chip: > 16 GiB
  compiled = {}
  real_compile = tpu_plan.compile_train_step

  def recording_compile(config, mesh, per_chip_batch, bucket):
    step = real_compile(config, mesh, per_chip_batch, bucket)
    compiled[per_chip_batch] = step.fits
    return step

  monkeypatch.setitem(tpu_plan._COMPILERS, "train", recording_compile)  # pylint: disable=protected-access
  monkeypatch.setattr(tpu_plan, "compile_train_step", recording_compile)
  plan = tpu_plan.plan(config, "v5e:2x2", per_chip_batch=2, programs=("train",))
  (step,) = plan.steps
  assert step.bucket == (5120, 5120)
  # The TPU compiler refuses it (RESOURCE_EXHAUSTED) and says how much it needed.
  assert not step.fits and "RESOURCE_EXHAUSTED" in step.error
  assert step.temp_bytes > tpu_plan.CHIPS["v5e"]["hbm_bytes"]
  # The search compiled one image per chip too, and that was refused as well.
  assert compiled == {2: False, 1: False} and step.fitting_batch == 0
  table = tpu_plan.format_plan(plan, tpu_plan.planning_config(config), mfu=0.4)
  assert "| NO |" in table
  assert "does NOT fit at 2 images per chip" in table
  assert "not even 1 image per chip compiles" in table


def test_the_largest_fitting_batch_is_searched_for(monkeypatch):
  # The search of `plan` for a step the compiler refuses, with a stand-in compiler whose
  # programs fit up to 5 images per chip.
  config = tiny_test.get_config()
  compiled = []

  def fake_compile(config, mesh, per_chip_batch, bucket):
    compiled.append(per_chip_batch)
    fits = per_chip_batch <= 5
    return tpu_plan.StepPlan("train", tuple(bucket), per_chip_batch, fits=fits,
                             temp_bytes=per_chip_batch * 3 * 2**30,
                             error="" if fits else "RESOURCE_EXHAUSTED: stand-in")

  monkeypatch.setitem(tpu_plan._COMPILERS, "train", fake_compile)  # pylint: disable=protected-access
  monkeypatch.setattr(tpu_plan, "compile_train_step", fake_compile)
  for per_chip_batch, expected in ((16, 5), (6, 5), (40, 5), (1, None)):
    compiled.clear()
    plan = tpu_plan.plan(config, "v5e:2x2", per_chip_batch=per_chip_batch, programs=("train",))
    (step,) = plan.steps
    if expected is None:  # 1 image per chip fits: no search
      assert step.fits and compiled == [1]
      continue
    assert not step.fits and step.fitting_batch == expected
    assert compiled[0] == per_chip_batch
    assert expected in compiled and expected + 1 in compiled  # both sides of the boundary
    assert len(compiled) <= 1 + math.ceil(math.log2(per_chip_batch))  # a binary search
    table = tpu_plan.format_plan(plan, tpu_plan.planning_config(config), mfu=0.4)
    assert f"does NOT fit at {per_chip_batch} images per chip" in table
    assert f"{expected} images per chip compile" in table


def test_unknown_generation_and_missing_class_count_are_clear_errors():
  with pytest.raises(ValueError, match="Unknown TPU generation"):
    tpu_plan.chip_generation("v9x:2x2")
  config = tiny_test.get_config()
  config.model.num_classes = -1
  with pytest.raises(ValueError, match="num_classes"):
    tpu_plan.planning_config(config)
  # "auto" would pick the CPU's 1x1-as-dot convolutions; the plan compiles XLA's.
  assert tpu_plan.planning_config(tiny_test.get_config()).model.conv_implementation == "xla"
