"""Shared pytest setup: 8 fake CPU devices, a compilation cache, the slowest tests first.

XLA_FLAGS must be set before jax initialises its backend, so it is set here, at import time of
the test session, for every test. Tests that need one device use `jax.devices()[:1]`.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# TensorFlow is used for tf.data only: keep it off any accelerator and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# JAX's persistent compilation cache, shared by the pytest workers and every command the tests
# run as a subprocess (they inherit the environment): the same small programs (eval, predict,
# init) are compiled by many tests. A program calling back to the host (the train step, with
# the Hungarian matcher on the host) is never cached by JAX and compiles in every process. A
# cache entry is the compiled program of exactly the same computation and compile options, so
# no result changes. The pytest process that creates the directory removes it at exit;
# `JAX_COMPILATION_CACHE_DIR` set beforehand is used as it is and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="detr_jax_tests_jit_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)

# The slowest tests (minutes each with two workers on the project's 2-core machine) start
# first, so that the two pytest-xdist workers end together instead of one of them running a
# 3-minute test alone at the end. Modules stay together (module-scoped fixtures are set up once
# per worker and module): the modules of the slowest tests come first, then the rest in order.
_SLOW_FIRST = (
    "tests/test_commands.py::test_kill_9_at_random_moments_loses_nothing",
    "tests/test_commands.py::test_main_job_evaluate_and_tensorboard",
    "tests/test_commands.py::test_convergence_benchmark",
    "tests/test_commands.py::test_custom_folder_commands",
    "tests/test_commands.py::test_train_bench_times_a_model_pytorch_lacks_alone",
    "tests/test_commands.py::test_tpu_plan_commands",
    "tests/test_commands.py::test_fine_tune_from_converted_then_evaluate_workdir",
    "tests/test_train.py::test_resume_after_sigterm_is_exact",
    "tests/test_train.py::test_training_stops_after_too_many_nonfinite_steps",
    "tests/test_multihost.py::test_two_processes_match_one_process",
)


def pytest_collection_modifyitems(items):
  modules = list(dict.fromkeys(name.split("::")[0] for name in _SLOW_FIRST))

  def rank(item):
    module = item.nodeid.split("::")[0]
    first = [i for i, name in enumerate(_SLOW_FIRST) if item.nodeid.startswith(name)]
    return (modules.index(module) if module in modules else len(modules),
            first[0] if first else len(_SLOW_FIRST))
  items.sort(key=rank)  # stable: the other tests keep their order
