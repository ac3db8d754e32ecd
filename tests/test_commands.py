"""Every command the README and the config docstrings show, run as a user types it.

Each documented command line is taken from the documentation itself and run in a shell from the
repository root, in a subprocess with one CPU device (as a user has it), on tiny data the tests
write. Placeholders (a published weights file, `/tmp/...` and `gs://` paths, `DIR`) are replaced
by the test's own files, and `--config.*` overrides shrink the data and the step count; published
COCO architectures are stood in for by configs/tiny_test.py where a converted checkpoint is needed.

`test_every_documented_command_is_covered` fails when a command appears in the documentation
that no test here runs (or that is not listed with the reason it is not run), so a new command
joins this file when it joins the README.
"""

import ast
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from configs import shapes
from configs import shapes_r18
from configs import tiny_test
from detr_jax import convert
from detr_jax.data import shapes as shapes_data
import torch_reference

REPO = pathlib.Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# Words a documented command starts with.
_PREFIXES = ("python", "PYTHONPATH=", "pip ", "pytest", "tensorboard", "tfds ")

# --- The documented commands, verbatim, grouped by the test that runs them.
MAIN_JOB = "python -m detr_jax.main --config configs/shapes.py --workdir /tmp/detr_shapes"
EVAL_MAIN_JOB = ("python -m detr_jax.evaluate --config configs/shapes.py "
                 "--checkpoint /tmp/detr_shapes")
TENSORBOARD = "tensorboard --logdir WORKDIR"
PREDICT = ("python -m detr_jax.predict --config configs/shapes.py --checkpoint /tmp/detr_shapes "
           '--images photo.jpg photos/ "more/*.png" --output /tmp/predictions --attention')
TINY_JOB = "python -m detr_jax.main --config configs/tiny_test.py --workdir /tmp/detr_tiny"
R18_JOB = "python -m detr_jax.main --config configs/shapes_r18.py --workdir /tmp/detr_shapes_r18"
EXPORT = (
    "python -m detr_jax.export --config configs/shapes_r18.py --checkpoint /tmp/detr_shapes_r18 "
    "--format hf --output /tmp/detr_shapes_hf",
    "python -m detr_jax.export --config configs/shapes_r18.py --checkpoint /tmp/detr_shapes_r18 "
    "--format official --output /tmp/detr_shapes.pth",
)
CONVERT_PTH = ("python -m detr_jax.convert --input detr-r50-e632da11.pth "
               "--config configs/detr_r50_coco.py --output /tmp/detr_r50")
CONVERT_SAFETENSORS = ("python -m detr_jax.convert --input model.safetensors "
                       "--config configs/detr_r101_coco.py --output /tmp/detr_r101")
EVAL_CONVERTED = ("python -m detr_jax.evaluate --config configs/detr_r50_coco.py "
                  "--checkpoint /tmp/detr_r50")
EVAL_CONVERTED_DOCSTRING = ("python -m detr_jax.evaluate --config configs/detr_r50_coco.py "
                            "--checkpoint DIR")
COCO_TRAINING = (
    "python -m detr_jax.main --config configs/detr_r50_coco.py --workdir gs://BUCKET/detr_r50 "
    "--config.dataset.data_dir=gs://BUCKET/tensorflow_datasets",
    "python -m detr_jax.main --config configs/detr_r50_dc5_coco.py --workdir DIR",
    "python -m detr_jax.main --config configs/detr_r101_coco.py --workdir DIR",
    "python -m detr_jax.main --config configs/detr_r101_dc5_coco.py --workdir DIR",
)
FAST_BENCH = ("PYTHONPATH=. python experiments/bench_train.py --config configs/shapes.py "
              "--iters 20 --jax_only")
FEED_BENCH = "PYTHONPATH=. python experiments/bench_feed.py --config configs/shapes.py"
BENCHMARKS = (
    "PYTHONPATH=. python experiments/bench_model.py --batch 2 --size 512 --iters 4",
    "PYTHONPATH=. python experiments/bench_matching.py",
    "PYTHONPATH=. python experiments/bench_input.py",
    "PYTHONPATH=. python experiments/bench_train.py --batch 2 --size 512 --iters 5",
    FAST_BENCH,
    FEED_BENCH,
)
CONFIG_ERROR = ("python -m detr_jax.main --config configs/tiny_test.py --workdir /tmp/w "
                "--config.model.num_querys=20")
CONVERGENCE = ("PYTHONPATH=. python experiments/convergence.py --minutes 6 --evals 4 "
               "--output /tmp/convergence")
CHAOS = "PYTHONPATH=. python experiments/chaos_resume.py --kills 12"
MAKE_FOLDER = "PYTHONPATH=. python experiments/make_coco_folder.py --output /tmp/synthetic_coco"
FOLDER_JOB = (
    "python -m detr_jax.main --config configs/coco_folder.py --workdir /tmp/detr_folder "
    "--config.dataset.annotations_file=/tmp/synthetic_coco/train.json "
    "--config.dataset.images_dir=/tmp/synthetic_coco/train "
    "--config.dataset.eval_annotations_file=/tmp/synthetic_coco/val.json "
    "--config.dataset.eval_images_dir=/tmp/synthetic_coco/val "
    "--config.dataset.data_dir=/tmp/synthetic_coco/tfds")
PADDING_SHIFT = ("PYTHONPATH=. python experiments/padding_shift.py --config configs/detr_r50_coco.py "
                 "--checkpoint /tmp/detr_r50 --num 50")
TPU_PLAN = (
    "python -m detr_jax.tpu_plan --config configs/detr_r50_coco.py --topology v5e:8x8 "
    "--topology v4:2x2x4 --topology v5p:2x2x4 --buckets largest",
    "python -m detr_jax.tpu_plan --config configs/detr_r50_coco.py --config.model.dtype=bfloat16 "
    "--topology v5e:8x8 --topology v4:2x2x4 --topology v5p:2x2x4 --buckets largest",
)
CI_INSTALL = 'pip install -e ".[convert,test,tpu]"'
# Run by .ci/run, line for line (checked by test_ci_runs_the_readme_install_and_tests).
CI_COMMANDS = (
    "python3 -m venv .venv && source .venv/bin/activate",
    "pip install torch==2.13.0",
    CI_INSTALL,
    "pytest -q -n 2 tests",
)
NOT_RUN = {
    'pip install -e ".[convert]"': f"a subset of the CI install, {CI_INSTALL}",
    "pip install -e .": f"a subset of the CI install, {CI_INSTALL}",
    "pytest tests/test_convert.py tests/test_models.py": "part of the CI run, pytest -q -n 2 tests",
    "pytest -q tests/test_bad_data.py --hypothesis-show-statistics": "part of the CI run, "
                                                                     "pytest -q -n 2 tests",
    'pip install -U "jax[cuda12]"': "installs JAX for NVIDIA GPUs, which this machine lacks",
    "tfds build coco/2017 --data_dir DIR": "downloads COCO, which cannot be reached here; the "
                                           "COCO commands are checked to ask for it",
}
RUN = {MAIN_JOB, EVAL_MAIN_JOB, TENSORBOARD, PREDICT, *EXPORT, TINY_JOB, CONVERT_PTH, CONVERT_SAFETENSORS,
       EVAL_CONVERTED, EVAL_CONVERTED_DOCSTRING, *COCO_TRAINING, *BENCHMARKS, *TPU_PLAN, CHAOS,
       PADDING_SHIFT, CONFIG_ERROR, CONVERGENCE, MAKE_FOLDER, FOLDER_JOB, R18_JOB}


def _command_lines(text: str):
  """Command lines of a shell snippet: continuations joined, comments dropped."""
  text = re.sub(r"\\\n\s*", " ", text)
  for line in text.splitlines():
    line = line.strip()
    if line.startswith("#"):
      continue
    line = re.split(r"\s+#", line)[0]
    if line.startswith(_PREFIXES):
      yield " ".join(line.split())


def documented_commands() -> dict[str, str]:
  """{command: where it is documented} from the README and the configs' docstrings."""
  found = {}
  readme = README.read_text()
  for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
    for command in _command_lines(block):
      found.setdefault(command, "README.md")
  for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", readme, flags=re.S)):
    span = " ".join(span.split())
    # Commands with arguments; `python -m detr_jax.convert` alone names a command in prose.
    if span.startswith(_PREFIXES) and len(span.split()) >= 3 and not re.fullmatch(
        r"python -m \S+", span):
      found.setdefault(span, "README.md")
  for path in sorted((REPO / "configs").glob("*.py")):
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    for command in _command_lines(docstring):
      found.setdefault(command, f"configs/{path.name}")
  return found


def test_every_documented_command_is_covered():
  documented = documented_commands()
  assert MAIN_JOB in documented and CONVERT_PTH in documented  # the collector finds commands
  known = RUN | set(CI_COMMANDS) | set(NOT_RUN)
  uncovered = {c: where for c, where in documented.items() if c not in known}
  assert not uncovered, f"Documented commands that no test runs: {uncovered}"
  stale = sorted(c for c in known if c not in documented)
  assert not stale, f"Commands tested here that the documentation no longer shows: {stale}"


def test_ci_runs_the_readme_install_and_tests():
  ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
  for command in CI_COMMANDS:
    assert command in ci_lines, f".ci/run must run the README's `{command}`"


# ------------------------------------------------------------------ running commands
def _env(**extra) -> dict[str, str]:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user has it (tests/conftest.py sets 8)
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", **extra)
  return env


def run_documented(command: str, replace: dict[str, str] | None = None, extra=(),
                   expect_rc: int = 0, env=None, timeout: int = 600):
  """Runs a documented command in bash from the repository root; returns the CompletedProcess.

  Args:
    command: the command exactly as documented.
    replace: placeholder -> value (a test's file or directory).
    extra: further arguments appended as a user would (config overrides).
    expect_rc: the exit code to assert (None: any non-zero).
  """
  for old, new in (replace or {}).items():
    assert old in command, f"{old!r} is not in {command!r}"
    command = command.replace(old, new)
  line = " ".join([command, *map(shlex.quote, map(str, extra))])
  result = subprocess.run(["bash", "-c", line], cwd=REPO, capture_output=True, text=True,
                          env=env or _env(), timeout=timeout, check=False)
  output = f"$ {line}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"
  if expect_rc is None:
    assert result.returncode != 0, output
  else:
    assert result.returncode == expect_rc, output
  return result


def _printed_metrics(stdout: str) -> dict[str, float]:
  metrics = json.loads(stdout[stdout.index("{"):stdout.rindex("}") + 1])
  assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "duplicates",
                          "duplicate_images"}, metrics
  return metrics


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tensorflow_datasets"))


# Shrinks the shapes main job to seconds: tiny splits, 2 steps, 2 pictures.
_SMALL_SHAPES = ("--config.num_train_steps=2", "--config.dataset.num_train_examples=16",
                 "--config.dataset.num_eval_examples=8", "--config.batch_size=8",
                 "--config.eval_batch_size=8", "--config.num_visualizations=2",
                 "--config.num_predictions=2")


def test_main_job_evaluate_and_tensorboard(tmp_path, data_dir):
  """README: the main job, evaluating its workdir again, predicting with it, TensorBoard on it."""
  workdir = str(tmp_path / "detr_shapes")
  data = f"--config.dataset.data_dir={data_dir}"
  result = run_documented(MAIN_JOB, {"/tmp/detr_shapes": workdir}, [*_SMALL_SHAPES, data])
  # The 6-minute recipe's quarter-width backbone: far fewer parameters than a ResNet-18's 11M.
  assert _resnet18_million_parameters(result) < 3.0, result.stderr[-2000:]
  # What the README says the main job writes: checkpoints, AP, PNGs of predicted boxes.
  trained = json.loads((tmp_path / "detr_shapes" / "eval_metrics.json").read_text())
  assert trained["step"] == 2
  assert len(list((tmp_path / "detr_shapes" / "visualizations").glob("*.png"))) == 2
  predicted = tmp_path / "detr_shapes" / "predictions"
  assert len(list(predicted.glob("image_*_attention.png"))) == 2
  assert len(json.loads((predicted / "predictions.json").read_text())["images"]) == 2
  assert (tmp_path / "detr_shapes" / "checkpoints").is_dir()

  result = run_documented(EVAL_MAIN_JOB, {"/tmp/detr_shapes": workdir},
                          [data, "--config.dataset.num_train_examples=16",
                           "--config.dataset.num_eval_examples=8", "--config.eval_batch_size=8"])
  metrics = _printed_metrics(result.stdout)
  for name, value in metrics.items():  # the same weights and images: the same AP
    assert value == pytest.approx(trained[name], abs=1e-4), name
  # It keeps what it scored: WORKDIR/eval/detections.json (COCO results format), metrics.json.
  out = tmp_path / "detr_shapes" / "eval"
  assert f"{out}/detections.json" in result.stderr
  detections = json.loads((out / "detections.json").read_text())
  # Every query of each of the 8 eval images.
  assert len({d["image_id"] for d in detections}) == 8
  assert len(detections) == 8 * shapes.get_config().model.num_queries
  saved = json.loads((out / "metrics.json").read_text())
  assert {k: round(v, 4) for k, v in saved.items()} == metrics

  _predict_on_files(tmp_path, workdir, data)

  result = run_documented(TENSORBOARD, {"WORKDIR": workdir}, ["--inspect"])
  for tag in ("train/loss", "eval/AP", "train/lr_transformer"):
    assert tag in result.stdout


def test_exportable_shapes_job_and_export(tmp_path, data_dir):
  """README "Exporting to PyTorch": configs/shapes_r18.py (2 steps here), then both exports."""
  workdir = tmp_path / "detr_shapes_r18"
  data = f"--config.dataset.data_dir={data_dir}"
  # The main job's test covers the pictures and predictions; none here.
  small = [arg for arg in _SMALL_SHAPES if "visualizations" not in arg and "predictions" not in arg]
  result = run_documented(R18_JOB, {"/tmp/detr_shapes_r18": str(workdir)},
                          [*small, "--config.num_visualizations=0", "--config.num_predictions=0",
                           data])
  assert json.loads((workdir / "eval_metrics.json").read_text())["step"] == 2
  # torchvision's ResNet-18 (11.2M parameters) and the transformer.
  assert _resnet18_million_parameters(result) > 11.0, result.stderr[-2000:]
  _export(tmp_path, str(workdir), data)  # the main job's backbone has no PyTorch counterpart


def _resnet18_million_parameters(result) -> float:
  """The parameter count (millions) a shapes job logs for its ResNet-18 model."""
  return float(re.search(r"Model: resnet18, ([\d.]+)M parameters", result.stderr).group(1))


def _predict_on_files(tmp_path, workdir, data):
  """README "Predicting on your own images", on the trained workdir: a file, a folder, a glob."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  photos, more = tmp_path / "pics", tmp_path / "other"
  photos.mkdir()
  more.mkdir()
  Image.fromarray(rng.integers(0, 256, (90, 120, 3), np.uint8)).save(tmp_path / "photo.jpg")
  Image.fromarray(rng.integers(0, 256, (128, 128), np.uint8)).save(photos / "gray.png")
  (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
  Image.fromarray(rng.integers(0, 256, (60, 200, 4), np.uint8), "RGBA").save(more / "a.png")
  out = tmp_path / "predictions"
  replace = {"/tmp/detr_shapes": workdir, "photo.jpg": str(tmp_path / "photo.jpg"),
             "photos/": f"{photos}/", "more/*.png": f"{more}/*.png", "/tmp/predictions": str(out)}
  result = run_documented(PREDICT, replace, [data, "--threshold=0.0"])
  assert f"Skipped {photos}/broken.jpg: not a readable image" in result.stderr
  assert "Predicted 3 images" in result.stdout
  summary = json.loads((out / "predictions.json").read_text())
  assert [os.path.basename(i["file"]) for i in summary["images"]] == ["photo.jpg", "gray.png",
                                                                       "a.png"]
  assert [(i["width"], i["height"]) for i in summary["images"]] == [(120, 90), (128, 128),
                                                                    (200, 60)]
  num_queries = shapes.get_config().model.num_queries
  assert all(len(i["detections"]) == num_queries for i in summary["images"])  # threshold 0
  assert len(json.loads((out / "detections_coco.json").read_text())) == 3 * num_queries
  for stem in ("photo", "gray", "a"):
    assert (out / f"{stem}.png").is_file() and (out / f"{stem}_attention.png").is_file()
  # Nothing readable: a clear error and a non-zero exit.
  result = run_documented(PREDICT, {**replace, "photo.jpg": f"{photos}/broken.jpg",
                                    "photos/": f"{tmp_path}/nowhere/",
                                    "more/*.png": f"{tmp_path}/nowhere/*.png"}, [data],
                          expect_rc=1)
  assert "No readable image" in result.stderr


def _export(tmp_path, workdir, data):
  """README "Exporting to PyTorch", on the trained workdir; transformers and torch load both."""
  hf_dir, pth = tmp_path / "detr_shapes_hf", tmp_path / "detr_shapes.pth"
  # Writing the transformers folder needs no torch: a `torch` that fails to import comes first.
  no_torch = tmp_path / "no_torch" / "torch"
  no_torch.mkdir(parents=True)
  (no_torch / "__init__.py").write_text("raise ImportError('torch is not installed')\n")
  result = run_documented(EXPORT[0], {"/tmp/detr_shapes_hf": str(hf_dir),
                                      "/tmp/detr_shapes_r18": workdir}, [data],
                          env=_env(PYTHONPATH=str(no_torch.parent)))
  assert f"at {hf_dir}" in result.stdout
  run_documented(EXPORT[1], {"/tmp/detr_shapes.pth": str(pth), "/tmp/detr_shapes_r18": workdir},
                 [data])
  from transformers import DetrForObjectDetection  # pylint: disable=g-import-not-at-top
  hf_model = DetrForObjectDetection.from_pretrained(str(hf_dir))
  assert hf_model.config.id2label == dict(enumerate(shapes_data.CLASS_NAMES))
  trained = _checkpoint_params(workdir)
  model_config = shapes_r18.get_config().model
  model_config.num_classes = len(shapes_data.CLASS_NAMES)
  for state in ({k: v.numpy() for k, v in hf_model.state_dict().items()},
                torch.load(pth, map_location="cpu", weights_only=True)):
    back = _flat(convert.from_torch_state_dict(state, model_config))
    for key, value in back.items():
      np.testing.assert_array_equal(value, trained[key], err_msg=key)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, data_dir):
  """README: convert a .pth (official layout) and a .safetensors (published HF names)."""
  tmp = tmp_path_factory.mktemp("convert")
  # configs/tiny_test.py stands in for the published architectures: ResNet-18, 6 classes.
  kwargs = dict(torch_reference.TINY_HF_KWARGS, num_labels=6)
  pth_state = torch_reference.hf_to_official(
      torch_reference.numpy_state_dict(torch_reference.random_hf_detr(seed=5, **kwargs)))
  pth_file = tmp / "detr-r50-e632da11.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in pth_state.items()}}, pth_file)
  hf_state = torch_reference.hf_to_published_names(
      torch_reference.numpy_state_dict(torch_reference.random_hf_detr(seed=6, **kwargs)))
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  safetensors_file = tmp / "model.safetensors"
  save_file(hf_state, str(safetensors_file))

  tiny = "configs/tiny_test.py"
  out_pth, out_st = str(tmp / "detr_r50"), str(tmp / "detr_r101")
  result = run_documented(CONVERT_PTH, {"detr-r50-e632da11.pth": str(pth_file),
                                        "configs/detr_r50_coco.py": tiny,
                                        "/tmp/detr_r50": out_pth})
  assert re.search(rf"Converted {re.escape(str(pth_file))} \(official layout, {len(pth_state)} "
                   rf"torch tensors\) into \d+ Flax arrays at {re.escape(out_pth)}", result.stdout)
  # Reading .safetensors needs no torch: a `torch` package that fails to import comes first.
  no_torch = tmp / "no_torch" / "torch"
  no_torch.mkdir(parents=True)
  (no_torch / "__init__.py").write_text("raise ImportError('torch is not installed')\n")
  result = run_documented(CONVERT_SAFETENSORS, {"model.safetensors": str(safetensors_file),
                                                "configs/detr_r101_coco.py": tiny,
                                                "/tmp/detr_r101": out_st},
                          env=_env(PYTHONPATH=str(no_torch.parent)))
  assert "(huggingface layout" in result.stdout

  model_config = tiny_test.get_config().model
  for out, state in ((out_pth, pth_state), (out_st, hf_state)):
    expected = convert.from_torch_state_dict(state, model_config)
    loaded = convert.load_variables(out)
    for path, value in _flat(expected).items():
      np.testing.assert_array_equal(_flat(loaded)[path], value, err_msg=path)
  return {"pth": out_pth, "safetensors": out_st, "variables": convert.load_variables(out_pth)}


_flat = torch_reference.flat_tree


def test_convert_then_evaluate(converted, data_dir):
  """README and configs/detr_r50_coco.py: evaluate a converted checkpoint."""
  data = f"--config.dataset.data_dir={data_dir}"
  results = []
  for command, placeholder in ((EVAL_CONVERTED, "/tmp/detr_r50"),
                               (EVAL_CONVERTED_DOCSTRING, "DIR")):
    result = run_documented(command, {"configs/detr_r50_coco.py": "configs/tiny_test.py",
                                      placeholder: converted["pth"]}, [data])
    results.append(_printed_metrics(result.stdout))
  assert results[0] == results[1]
  result = run_documented(EVAL_CONVERTED, {"configs/detr_r50_coco.py": "configs/tiny_test.py",
                                           "/tmp/detr_r50": converted["safetensors"]}, [data])
  _printed_metrics(result.stdout)


def _checkpoint_params(workdir):
  from detr_jax import evaluate  # pylint: disable=g-import-not-at-top
  return _flat(evaluate.load_variables_for_eval(workdir))


def test_fine_tune_from_converted_then_evaluate_workdir(tmp_path, converted, data_dir):
  """README: `--config.init_from=DIR` on the tiny job, then `evaluate` on its workdir."""
  workdir = str(tmp_path / "detr_tiny")
  data = f"--config.dataset.data_dir={data_dir}"
  result = run_documented(TINY_JOB, {"/tmp/detr_tiny": workdir},
                          [data, f"--config.init_from={converted['pth']}"])
  assert "Initialising from converted checkpoint" in result.stderr
  # 4 Adam steps at lr 1e-3 move each weight by at most ~4e-3: the run started from the file
  # (a fresh init differs by O(1)).
  trained = _checkpoint_params(workdir)
  start = _flat(converted["variables"])
  for path in ("params/query_embed/embedding", "params/class_embed/kernel",
               "params/backbone/conv1/kernel"):
    assert np.abs(trained[path] - start[path]).max() < 0.01, path
  np.testing.assert_array_equal(trained["batch_stats/backbone/bn1/var"],
                                start["batch_stats/backbone/bn1/var"])  # frozen BatchNorm
  result = run_documented(EVAL_MAIN_JOB, {"configs/shapes.py": "configs/tiny_test.py",
                                          "/tmp/detr_shapes": workdir}, [data])
  metrics = _printed_metrics(result.stdout)
  saved = json.loads((tmp_path / "detr_tiny" / "eval_metrics.json").read_text())
  assert metrics["AP"] == pytest.approx(saved["AP"], abs=1e-4)


def test_backbone_init_from_torchvision_weights(tmp_path, data_dir):
  """README: `--config.backbone_init=FILE` (torchvision ResNet weights, .pth)."""
  torch.manual_seed(0)
  resnet = torch_reference.TorchvisionResNet(torch_reference.BasicBlock, (2, 2, 2, 2))
  torch_reference.randomize_frozen_batchnorm(resnet, torch.Generator().manual_seed(1))
  weights = tmp_path / "resnet18.pth"
  torch.save(resnet.state_dict(), weights)
  workdir = str(tmp_path / "detr_tiny")
  result = run_documented(TINY_JOB, {"/tmp/detr_tiny": workdir},
                          [f"--config.dataset.data_dir={data_dir}",
                           f"--config.backbone_init={weights}", "--config.eval_every_steps=-1"])
  assert "Initialising the backbone from torchvision weights" in result.stderr
  trained = _checkpoint_params(workdir)
  conv1 = resnet.conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
  assert np.abs(trained["params/backbone/conv1/kernel"] - conv1).max() < 0.01
  np.testing.assert_allclose(trained["batch_stats/backbone/layer2_0/bn1/mean"],
                             resnet.layer2[0].bn1.running_mean.numpy(), rtol=0, atol=0)


@pytest.mark.parametrize("command", COCO_TRAINING)
def test_coco_commands_ask_for_the_dataset(command, tmp_path):
  """configs/detr_*_coco.py: without COCO prepared, the command says how to prepare it."""
  workdir, data = str(tmp_path / "workdir"), str(tmp_path / "tensorflow_datasets")
  if "gs://" in command:
    replace = {"gs://BUCKET/detr_r50": workdir, "gs://BUCKET/tensorflow_datasets": data}
    extra = ()
  else:
    replace, extra = {"DIR": workdir}, (f"--config.dataset.data_dir={data}",)
  result = run_documented(command, replace, extra, expect_rc=None)
  assert "tfds build coco/2017" in result.stderr
  assert "DuplicateFlagError" not in result.stderr


@pytest.mark.parametrize("command", BENCHMARKS)
def test_benchmark_help_lists_its_documented_options(command):
  options = re.findall(r"--\w+", command)
  script = command.split(" --")[0]
  result = run_documented(script, extra=["--help"])
  for option in options:
    assert option in result.stdout, f"{script} --help does not list {option}"


def test_train_bench_times_a_model_pytorch_lacks_alone():
  """README results: the width-16 main job's step and its parts, detr_jax only."""
  result = run_documented(FAST_BENCH, {"--iters 20": "--iters 1"})
  assert re.search(r"train step detr_jax +median [0-9.]+ s", result.stdout), result.stdout
  parts = re.findall(r"^\| ([a-z +()]+) \| ([0-9]+) ms \|$", result.stdout, re.M)
  assert [name for name, _ in parts] == [
      "backbone forward", "backbone forward + backward", "model forward + backward (no loss)",
      "matching + loss (forward + grad)", "optimizer update"], result.stdout
  assert "pytorch" not in result.stdout.lower(), result.stdout
  report = _flop_report(result.stdout)
  assert report["against"] == "detr_jax" and "peak_PyTorch" not in report, report
  # Without --jax_only it says why there is nothing to compare with.
  refused = run_documented(FAST_BENCH.replace(" --jax_only", ""), expect_rc=2)
  assert "model.backbone_width=16" in refused.stderr and "--jax_only" in refused.stderr


def _flop_report(stdout: str) -> dict[str, float]:
  """The FLOP lines of experiments/bench_train.py: work, peak, rates and the peak's step time."""
  work = re.search(r"^work per step: ([0-9.]+) GFLOP", stdout, re.M)
  peak = re.search(r"^float32 matrix-product peak here: ([0-9]+) GFLOP/s \(fastest 2048 x 2048 "
                   r"x 2048 product: (.*)\)$", stdout, re.M)
  bound = re.search(r"^a step at that peak would take ([0-9.]+) s: at most ([0-9.]+)x the "
                    r"(\w+) images/s", stdout, re.M)
  assert work and peak and bound, stdout
  by_library = dict((name, float(rate)) for name, rate in
                    re.findall(r"(XLA|NumPy|PyTorch) ([0-9]+)", peak.group(2)))
  rates = dict((name, float(rate)) for name, rate in
               re.findall(r"(detr_jax|pytorch) ([0-9]+) GFLOP/s \(", stdout))
  medians = dict((name, float(s)) for name, s in
                 re.findall(r"^train step (\w+) +median ([0-9.]+) s", stdout, re.M))
  gflop, best = float(work.group(1)), float(peak.group(1))
  assert best == max(by_library.values()), stdout
  assert abs(float(bound.group(1)) - gflop / best) <= 2e-3 + 0.01 * gflop / best, stdout
  for name, seconds in medians.items():
    # The printed rate is the work over the median step time; no step beats the peak's time.
    assert abs(rates[name] - gflop / seconds) <= 1 + 0.03 * rates[name], stdout  # rounding
    assert float(bound.group(1)) < seconds, stdout
  # "At most Nx": the step compared against over the peak's step time.
  ratio = medians[bound.group(3)] / float(bound.group(1))
  assert abs(float(bound.group(2)) - ratio) <= 0.01 + 0.03 * ratio, stdout  # rounding
  return {"gflop": gflop, "peak": best, **{f"peak_{k}": v for k, v in by_library.items()},
          "against": bound.group(3)}


def test_train_bench_against_pytorch_reports_flop_rates():
  """The PyTorch side of experiments/bench_train.py on the tiny config (the README's R50 and
  shapes_r18 runs take minutes): both steps, the ratio, the work and the peak's bound."""
  result = run_documented(
      "PYTHONPATH=. python experiments/bench_train.py --config configs/tiny_test.py --iters 2 "
      "--no_parts")
  assert re.search(r"^ratio detr_jax / pytorch images/s: [0-9.]+x$", result.stdout, re.M), (
      result.stdout)
  report = _flop_report(result.stdout)
  assert set(k for k in report if k.startswith("peak_")) == {"peak_XLA", "peak_NumPy",
                                                              "peak_PyTorch"}, report
  assert report["against"] == "pytorch", report
  # A closed form below the count: the trained ResNet-18's convolutions (64 x 64 images, batch
  # 8), each multiply-add counted once per kernel tap that lands inside the map (XLA counts
  # padding's taps as no work), in the forward pass, the weight gradient and, but for the stem's,
  # the input gradient; two FLOPs per multiply-add. On top come the transformer, heads and loss
  # and the padded taps of the 3 x 3 convolutions on 2 x 2 maps (products over zero-padded
  # patches, see models/conv.py): less than the backbone's count again.
  def inside_taps(n, kernel, stride, pad):  # [sum over output rows of kernel rows inside] ** 2
    rows = sum(sum(0 <= o * stride - pad + i < n for i in range(kernel))
               for o in range((n + 2 * pad - kernel) // stride + 1))
    return rows ** 2

  stem = inside_taps(64, 7, 2, 3) * 3 * 64
  body, n, channels = 0, 16, 64  # layer1 reads the 16 x 16 map after the stem's pooling
  for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
    body += inside_taps(n, 3, stride, 1) * channels * width  # block 1, first convolution
    if stride == 2:
      body += inside_taps(n, 1, 2, 0) * channels * width  # its 1x1 downsample
    n //= stride
    body += 3 * inside_taps(n, 3, 1, 1) * width * width  # the other three
    channels = width
  backbone_gflop = 2 * 8 * (2 * stem + 3 * body) / 1e9
  assert backbone_gflop < report["gflop"] < 2 * backbone_gflop, (report, backbone_gflop)


def test_feed_bench_times_the_step_fed_by_each_input():
  """README results: the step fed by each training input, against the step before read-ahead."""
  result = run_documented(FEED_BENCH, {"configs/shapes.py": "configs/tiny_test.py"},
                          extra=["--steps", "2", "--reps", "1", "--input_batches", "3"])
  loops = re.findall(r"^\| ([a-z_, ()]+) \| ([0-9.]+) \| ([0-9.]+)x \|$", result.stdout, re.M)
  assert [name for name, _, _ in loops] == [
      "cache_train, read first (baseline)", "fixed batch", "cache_train",
      "cache_train_resized"], result.stdout
  assert loops[0][2] == "1.00" and all(float(ms) > 0 for _, ms, _ in loops), result.stdout
  inputs = re.findall(r"^\| (cache_train\w*) \| ([0-9.]+) \| ([0-9.]+) \|$", result.stdout, re.M)
  assert [name for name, _, _ in inputs] == ["cache_train", "cache_train_resized"], result.stdout


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e \".[tpu]\")")
@pytest.mark.parametrize("command,topologies", [
    (TPU_PLAN[0], ("v5p:2x2x1",)), (TPU_PLAN[1], ("v5e:2x2", "v4:2x2x1"))])
def test_tpu_plan_commands(command, topologies):
  """README "Planning a TPU pod run": the R50 commands, on the tiny config and small slices.

  Every generation's path is taken (v5e; v4 and v5p as one device per chip, "megacore").
  """
  slices = "--topology v5e:8x8 --topology v4:2x2x4 --topology v5p:2x2x4"
  replace = {"configs/detr_r50_coco.py": "configs/tiny_test.py",
             slices: " ".join(f"--topology {t}" for t in topologies)}
  result = run_documented(command, replace)
  for topology in topologies:
    assert f"{topology}: 4 {topology.split(':')[0]} chips" in result.stdout, result.stdout
  assert result.stdout.count("| train | 64x64 | 2 |") == len(topologies), result.stdout
  assert result.stdout.count("| eval | 64x64 | 2 |") == len(topologies), result.stdout
  assert result.stdout.count("Everything fits.") == len(topologies), result.stdout
  dtype = "bfloat16" if "bfloat16" in command else "float32"
  assert f"model.dtype={dtype}" in result.stdout


def test_readme_python_example_runs(tmp_path):
  """README "Using the model": the Python example, as written."""
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert blocks, "the README shows a Python example"
  for i, code in enumerate(blocks):
    script = tmp_path / f"example_{i}.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                            text=True, env=_env(PYTHONPATH=str(REPO)), timeout=600, check=False)
    assert result.returncode == 0, f"{code}\n--- stderr\n{result.stderr[-4000:]}"
    # `print(...)  # what it prints`: the README's comment is what a reader expects to see.
    expected = re.findall(r"^print\(.*?\)[ \t]+#[ \t]*(.+)$", code, re.M)
    printed = result.stdout.strip().splitlines()
    assert len(printed) == len(expected), (printed, expected)
    for line, comment in zip(printed, expected):
      assert line.strip() == comment.strip(), (line, comment)


def test_library_modules_define_no_flags():
  """Importing any detr_jax module other than the `main` entry point defines no absl flags.

  A module that defined flags on import broke every entry point that imported it after defining
  its own `--config` (DuplicateFlagError). Flags of other libraries (absl, TensorFlow, orbax)
  are not counted.
  """
  code = (
      "import importlib, pkgutil, detr_jax\n"
      "from absl import flags\n"
      "names = sorted(m.name for m in pkgutil.walk_packages(detr_jax.__path__, 'detr_jax.'))\n"
      "for name in names:\n"
      "  if name != 'detr_jax.main':\n"
      "    importlib.import_module(name)\n"
      "ours = {m: sorted(f.name for f in fs) for m, fs in flags.FLAGS.flags_by_module_dict().items()\n"
      "        if m.startswith('detr_jax')}\n"
      "print(len(names), ours)\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=_env(), timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  count, defined = result.stdout.strip().split(" ", 1)
  assert int(count) > 10, result.stdout
  assert defined == "{}", f"modules that define flags on import: {defined}"


def test_configs_load_from_any_directory(tmp_path):
  """A config that builds on another (`from configs import detr_r50_coco`) loads from any cwd:
  the `configs` package is installed with the project."""
  config = REPO / "configs" / "detr_r101_coco.py"
  workdir, data = tmp_path / "workdir", tmp_path / "tensorflow_datasets"
  result = subprocess.run(
      [sys.executable, "-m", "detr_jax.main", f"--config={config}", f"--workdir={workdir}",
       f"--config.dataset.data_dir={data}"], cwd=tmp_path, capture_output=True, text=True,
      env=_env(), timeout=300, check=False)
  assert "ModuleNotFoundError" not in result.stderr, result.stderr[-3000:]
  assert "tfds build coco/2017" in result.stderr, result.stderr[-3000:]


def test_sequence_fields_override_from_the_command_line(tmp_path):
  """Every sequence field of the configs is a tuple, which --config.x=... can override."""
  script = tmp_path / "show.py"
  script.write_text(
      "from absl import app\n"
      "from ml_collections import config_flags\n"
      "CONFIG = config_flags.DEFINE_config_file('config', None, lock_config=False)\n"
      "def main(_):\n"
      "  d = CONFIG.value.dataset\n"
      "  print(repr((d.scales, d.buckets, d.crop_resize_scales)))\n"
      "app.run(main)\n")
  for name in ("detr_r50_coco", "shapes", "tiny_test"):
    config = REPO / "configs" / f"{name}.py"
    result = subprocess.run(
        [sys.executable, str(script), f"--config={config}", "--config.dataset.scales=(96,112)",
         "--config.dataset.buckets=((96,96),(112,112))",
         "--config.dataset.crop_resize_scales=(48,)"],
        cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "((96, 112), ((96, 96), (112, 112)), (48,))"


def test_kill_9_at_random_moments_loses_nothing(tmp_path):
  """README: the chaos run, shortened to 3 kills (one while a checkpoint is written at least)."""
  result = run_documented(CHAOS, extra=("--kills", "3", "--steps", "6", "--seed", "1",
                                        "--workdir", tmp_path), timeout=900)
  assert "kills survived: 3 " in result.stdout, result.stdout
  assert "while a checkpoint was being written: 0)" not in result.stdout, result.stdout
  assert "bit for bit" in result.stdout and "differing: 0" in result.stdout, result.stdout


def test_padding_shift_on_a_converted_model(converted, tmp_path):
  """README: how far eval padding moves a converted model's outputs (tiny stand-in, images of
  five sizes)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import coco_folder_testdata  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "images"
  folder.mkdir()
  for i, (h, w, rects) in enumerate(coco_folder_testdata.EVAL_IMAGES):
    Image.fromarray(coco_folder_testdata.draw(h, w, rects)).save(folder / f"{i}.png")
  result = run_documented(
      PADDING_SHIFT, {"configs/detr_r50_coco.py": "configs/tiny_test.py",
                      "/tmp/detr_r50": converted["pth"]},
      ["--images", folder, "--set", "dataset.eval_size=64", "dataset.eval_max_size=96",
       "dataset.buckets=((64,64),(64,96),(96,64),(96,96))"])
  rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in result.stdout.splitlines()
          if line.startswith("| ") and not line.startswith("| padding")}
  assert set(rows) == {"unpadded", "bucket", "image-32"}, result.stdout
  assert float(rows["unpadded"][0]) == 0.0  # the reference against itself
  assert float(rows["bucket"][0]) > 0.0  # padding moves the outputs
  # Distinct padded shapes: the 5 own sizes; their 3 buckets; rounded to 32, also 3.
  assert [int(rows[m][-1]) for m in ("unpadded", "bucket", "image-32")] == [5, 3, 3]


def test_readme_config_error_example(tmp_path):
  """README: the misspelled-field example prints exactly the line the README shows."""
  result = run_documented(CONFIG_ERROR, {"/tmp/w": str(tmp_path / "w")}, expect_rc=2)
  shown = re.search(r"```\n(error: .*?)\n```", README.read_text()).group(1)
  assert result.stderr.strip().splitlines()[-1] == shown, result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_convergence_benchmark(tmp_path, data_dir):
  """README: the time-to-accuracy benchmark, shortened to seconds on the tiny config."""
  out = tmp_path / "convergence"
  result = run_documented(
      CONVERGENCE, {"/tmp/convergence": str(out)},
      ["--config", "configs/tiny_test.py", "--minutes", "0.01", "--evals", "1",
       "--variants", "baseline,group_o2m", "--set", f"dataset.data_dir={data_dir}",
       "--seeds", "3,4"])
  table = (out / "convergence.md").read_text()
  assert table in result.stdout
  runs, summary = table.split("Final evaluation over 2 seeds")
  rows = [[c.strip() for c in line.split("|")[1:-1]] for line in runs.splitlines()[2:] if line]
  assert [r[:2] for r in rows] == [["baseline", "3"], ["baseline", "4"], ["group_o2m", "3"],
                                   ["group_o2m", "4"]], table
  assert all(len(r) == 8 and r[7].isdigit() for r in rows), table  # images with duplicates
  means = [[c.strip() for c in line.split("|")[1:-1]] for line in summary.splitlines()[4:]]
  assert [m[0] for m in means] == ["baseline", "group_o2m"], table
  curves = json.loads((out / "curves.json").read_text())
  for variant, mean in zip(("baseline", "group_o2m"), means):
    assert sorted(curves[variant]) == ["3", "4"]
    ap = [curves[variant][seed][-1][2]["AP"] for seed in ("3", "4")]
    assert mean[2] == f"{np.mean(ap):.3f} ({min(ap):.3f} - {max(ap):.3f})", table
  assert (out / "convergence.png").stat().st_size > 1000
  bad = run_documented(CONVERGENCE, {"/tmp/convergence": str(out)}, ["--seeds", "1,1"],
                       expect_rc=2)
  assert "repeats a seed" in bad.stderr


def test_custom_folder_commands(tmp_path):
  """configs/coco_folder.py: write the synthetic folder, then train on it with the config (both
  commands as documented; fewer images, smaller images and 2 steps)."""
  root = tmp_path / "synthetic_coco"
  run_documented(MAKE_FOLDER, {"/tmp/synthetic_coco": str(root)}, ["--train", "6", "--val", "3"])
  train_json = json.loads((root / "train.json").read_text())
  assert sorted(c["id"] for c in train_json["categories"]) == [2, 5, 11, 17]
  assert len(train_json["images"]) == 6 and len(list((root / "val").glob("*.jpg"))) == 3
  sizes = {(i["height"], i["width"]) for i in train_json["images"]}
  assert all(320 <= side <= 640 for size in sizes for side in size) and len(sizes) > 1
  workdir = tmp_path / "detr_folder"
  result = run_documented(
      FOLDER_JOB, {"/tmp/synthetic_coco": str(root), "/tmp/detr_folder": str(workdir)},
      ["--config.num_train_steps=2", "--config.batch_size=2", "--config.eval_batch_size=2",
       "--config.dataset.scales=(64,)", "--config.dataset.max_size=96",
       "--config.dataset.eval_size=64", "--config.dataset.eval_max_size=96",
       "--config.dataset.buckets=((64, 96), (96, 64), (96, 96))",
       "--config.model.enc_layers=1", "--config.model.dec_layers=1",
       "--config.num_visualizations=1"])
  assert "18 classes" in result.stderr, result.stderr[-3000:]  # ids up to 17: 18 with gaps
  assert "eval/AP50" in result.stderr
  assert list((workdir / "visualizations").glob("*.png"))
