r"""Evaluation: DETR post-processing and COCO box AP with pycocotools.

Post-processing is the official one (`models/detr.py`, `PostProcess.forward`, in
facebookresearch/detr at commit 29901c5): softmax over the classes, drop the "no object" column,
score = max probability, label = its argmax, boxes cxcywh -> xyxy scaled by the original image
size; no threshold, no NMS, every query is a detection.

The COCO ground truth is built from the eval batches' `gt_*` fields (all annotations, crowd
included, in original pixels), so any dataset of the input pipeline is scored the same way.

Command (a training workdir, its checkpoints dir, or a `python -m detr_jax.convert` output):
  python -m detr_jax.evaluate --config configs/detr_r50_coco.py --checkpoint DIR
"""

import contextlib
import io
import json
from typing import Any, Callable, Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
from pycocotools import coco
from pycocotools import cocoeval

from detr_jax import losses

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_GT_KEYS = ("image_id", "orig_size", "example_valid", "gt_boxes", "gt_labels", "gt_is_crowd",
            "gt_area", "gt_valid")


def postprocess(pred_logits, pred_boxes, orig_size, activation: str = "softmax"):
  """Turns raw DETR outputs into scored detections (official PostProcess).

  Works on numpy or jax arrays.

  Args:
    pred_logits: [batch, queries, num_classes + 1]; the last class is "no object".
    pred_boxes: [batch, queries, 4] cxcywh in [0, 1] of the unpadded image.
    orig_size: [batch, 2] (height, width) of the original images.
    activation: "softmax" (official) or "sigmoid" (models trained with a sigmoid label loss,
      e.g. sigmoid_focal: independent scores of the real classes). See `losses.LabelLoss`.

  Returns:
    (scores [batch, queries], labels [batch, queries] int32, boxes [batch, queries, 4] xyxy in
    original pixels).
  """
  pred_logits = jnp.asarray(pred_logits, jnp.float32)
  if activation == "softmax":
    prob = jax.nn.softmax(pred_logits, axis=-1)[..., :-1]
  elif activation == "sigmoid":
    prob = jax.nn.sigmoid(pred_logits[..., :-1])
  else:
    raise ValueError(f"Unknown activation {activation!r}; use 'softmax' or 'sigmoid'.")
  scores = prob.max(axis=-1)
  labels = prob.argmax(axis=-1).astype(jnp.int32)
  cx, cy, w, h = jnp.moveaxis(jnp.asarray(pred_boxes, jnp.float32), -1, 0)
  xyxy = jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
  height, width = jnp.moveaxis(jnp.asarray(orig_size, jnp.float32), -1, 0)
  scale = jnp.stack([width, height, width, height], axis=-1)[:, None, :]
  return scores, labels, xyxy * scale


class CocoEvaluator:
  """Accumulates ground truth and detections batch by batch; `compute` runs pycocotools."""

  def __init__(self, class_names: dict[int, str]):
    if not class_names:
      raise ValueError("CocoEvaluator needs the dataset's class names {id: name}.")
    self._categories = [{"id": int(i), "name": str(n)} for i, n in sorted(class_names.items())]
    self._images, self._annotations, self._detections = [], [], []
    self._seen = set()

  @property
  def num_images(self) -> int:
    return len(self._images)

  def add_batch(self, batch: dict[str, np.ndarray], scores: np.ndarray, labels: np.ndarray,
                boxes: np.ndarray) -> None:
    """Adds one batch.

    Args:
      batch: numpy eval batch with the input pipeline's image_id, orig_size, example_valid and gt_*
        fields (gt_boxes xywh in original pixels).
      scores: [b, queries] detection scores.
      labels: [b, queries] detection labels in the dataset's category-id space.
      boxes: [b, queries, 4] xyxy in original pixels.
    """
    missing = [k for k in _GT_KEYS if k not in batch]
    if missing:
      raise ValueError(f"Eval batches need the fields {missing} for COCO evaluation.")
    for i in np.flatnonzero(np.asarray(batch["example_valid"])):
      image_id = int(batch["image_id"][i])
      if image_id in self._seen:  # an image repeated to fill a batch counts once
        continue
      self._seen.add(image_id)
      height, width = (int(v) for v in batch["orig_size"][i])
      self._images.append({"id": image_id, "height": height, "width": width})
      for j in np.flatnonzero(np.asarray(batch["gt_valid"][i])):
        self._annotations.append({
            "id": len(self._annotations) + 1, "image_id": image_id,
            "category_id": int(batch["gt_labels"][i, j]),
            "bbox": [float(v) for v in batch["gt_boxes"][i, j]],
            "area": float(batch["gt_area"][i, j]),
            "iscrowd": int(bool(batch["gt_is_crowd"][i, j]))})
      x0, y0, x1, y1 = np.moveaxis(np.asarray(boxes[i], np.float64), -1, 0)
      self._detections.append(np.stack([
          np.full_like(x0, image_id), x0, y0, x1 - x0, y1 - y0,
          np.asarray(scores[i], np.float64), np.asarray(labels[i], np.float64)], axis=-1))

  def compute(self) -> dict[str, float]:
    """Returns {AP, AP50, AP75, APs, APm, APl} (fractions in [0, 1]) from pycocotools."""
    if not self._images:
      raise ValueError("No valid evaluation images were added.")
    ground_truth = coco.COCO()
    ground_truth.dataset = {"images": self._images, "annotations": self._annotations,
                            "categories": self._categories}
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
      ground_truth.createIndex()
      detections = np.concatenate(self._detections, axis=0)  # [N, 7]
      if not len(detections) or not self._annotations:
        return {name: 0.0 for name in METRIC_NAMES}
      results = ground_truth.loadRes(detections)
      evaluator = cocoeval.COCOeval(ground_truth, results, iouType="bbox")
      evaluator.evaluate()
      evaluator.accumulate()
      evaluator.summarize()
    logging.info("COCO box evaluation:\n%s", summary.getvalue())
    # pycocotools reports -1 where no ground truth of that size exists (e.g. no large objects);
    # kept as -1 so that it is not read as a score of 0.
    return {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats[:6])}


def make_predict_fn(model, mesh, activation: str = "softmax") -> Callable[..., Any]:
  """Returns a jitted fn(variables, images, pixel_mask, orig_size) -> (scores, labels, boxes).

  Inputs and outputs are sharded on the mesh axis "data", variables replicated; `activation` as
  in `postprocess`.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

  def predict(variables, images, pixel_mask, orig_size):
    outputs = model.apply(variables, images, pixel_mask, train=False)
    return postprocess(outputs["pred_logits"], outputs["pred_boxes"], orig_size, activation)

  return jax.jit(predict, in_shardings=(replicated, data, data, data),
                 out_shardings=(data, data, data))


def _to_host(x, mesh) -> np.ndarray:
  # This process's rows of a batch-sharded global array.
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, P("data")))


def predict_batches(config, model, variables, mesh) -> Iterator[tuple[dict, tuple]]:
  """Yields (local numpy eval batch, (scores, labels, boxes) of its rows) over the eval split."""
  from detr_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  activation = losses.get_label_loss(config.loss.get("label_loss", "softmax_ce")).activation
  predict = make_predict_fn(model, mesh, activation)
  for local in input_pipeline.create_eval_iterator(config):
    inputs = input_pipeline.make_global_batch(
        {"images": local["images"], "pixel_mask": local["pixel_mask"],
         "orig_size": np.asarray(local["orig_size"], np.int32)}, mesh)
    outs = predict(variables, inputs["images"], inputs["pixel_mask"], inputs["orig_size"])
    yield local, tuple(_to_host(o, mesh) for o in outs)


def evaluate_coco(config, model, variables, mesh, class_names: dict[int, str]) -> dict[str, float]:
  """Runs the model over the eval split of every process and returns COCO box AP metrics.

  Every process gathers all predictions (they are small: queries x 6 numbers per image) and
  computes the same metrics, so any process may log them.
  """
  evaluator = CocoEvaluator(class_names)
  for local, (scores, labels, boxes) in predict_batches(config, model, variables, mesh):
    fields = {k: np.asarray(local[k]) for k in _GT_KEYS}
    if jax.process_count() > 1:
      fields, scores, labels, boxes = multihost_utils.process_allgather(
          (fields, scores, labels, boxes), tiled=True)
    evaluator.add_batch(fields, scores, labels, boxes)
  metrics = evaluator.compute()
  logging.info("Evaluated %d images: %s", evaluator.num_images,
               json.dumps({k: round(v, 4) for k, v in metrics.items()}))
  return metrics


def load_variables_for_eval(path: str) -> dict[str, Any]:
  """Loads {"params", "batch_stats"} from a training workdir / checkpoints dir (latest step) or a
  directory written by `python -m detr_jax.convert`."""
  from detr_jax import checkpointing  # pylint: disable=g-import-not-at-top
  ckpt_dir = checkpointing.find_checkpoint_dir(path)
  if ckpt_dir is not None:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    manager = checkpointing.create_checkpoint_manager(path, read_only=True, directory=ckpt_dir)
    step = manager.latest_step()
    logging.info("Evaluating training checkpoint of step %d in %s.", step, ckpt_dir)
    restored = manager.restore(step, args=ocp.args.StandardRestore())
    get = restored.get if isinstance(restored, dict) else lambda k: getattr(restored, k)
    return {"params": get("params"), "batch_stats": get("batch_stats")}
  from detr_jax import convert  # pylint: disable=g-import-not-at-top
  try:
    return dict(convert.load_variables(path))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"{path} is neither a training workdir/checkpoint dir nor a directory written by "
        f"`python -m detr_jax.convert`: {e}") from e


def run(config: ml_collections.ConfigDict, checkpoint: str) -> dict[str, float]:
  """Evaluates the weights in `checkpoint` on `config`'s eval split; returns the metrics."""
  from detr_jax import models  # pylint: disable=g-import-not-at-top
  from detr_jax import train  # pylint: disable=g-import-not-at-top
  from detr_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  info = input_pipeline.dataset_info(config.dataset)
  config = train.resolve_config(config, info)
  mesh = train.create_mesh()
  model = models.build_model(config.model)
  variables = load_variables_for_eval(checkpoint)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.device_put(variables, replicated)
  return evaluate_coco(config, model, variables, mesh, info.class_names)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  metrics = run(flags.FLAGS.config, flags.FLAGS.checkpoint)
  print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=1))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                  lock_config=False)
  flags.DEFINE_string("checkpoint", None, "Training workdir, its checkpoints dir, or a "
                      "converted checkpoint dir.")
  flags.mark_flags_as_required(["config", "checkpoint"])
  app.run(main)
