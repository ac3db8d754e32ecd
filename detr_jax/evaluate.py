r"""Evaluation: DETR post-processing and COCO box AP with pycocotools.

Post-processing is the official one (`detr_jax.inference.postprocess`, from `models/detr.py`,
`PostProcess.forward`, in facebookresearch/detr): no threshold, no NMS, every query is a
detection.

The COCO ground truth is built from the eval batches' `gt_*` fields (all annotations, crowd
included, in original pixels), so any dataset of the input pipeline is scored the same way.

Command (a training workdir, its checkpoints dir, or a `python -m detr_jax.convert` output):
  python -m detr_jax.evaluate --config configs/detr_r50_coco.py --checkpoint DIR
"""

import contextlib
import io
import json
import os
import sys
from typing import Any, Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from pycocotools import coco
from pycocotools import cocoeval

from detr_jax import inference
from detr_jax import parallel

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_GT_KEYS = ("image_id", "orig_size", "example_valid", "gt_boxes", "gt_labels", "gt_is_crowd",
            "gt_area", "gt_valid")


postprocess = inference.postprocess  # re-exported; lives in detr_jax.inference


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

  def ground_truth(self) -> dict[str, list]:
    """The COCO-format ground truth gathered so far ({"images", "annotations", "categories"})."""
    return {"images": self._images, "annotations": self._annotations,
            "categories": self._categories}

  def detections(self) -> list[dict[str, Any]]:
    """The detections in the COCO results format, exactly what `compute` scores.

    One entry per query and image: {"image_id", "category_id", "bbox": [x, y, w, h] in original
    pixels, "score"}, the format of a COCO test-dev submission.
    """
    if not self._detections:
      return []
    rows = np.concatenate(self._detections, axis=0)
    return [{"image_id": int(r[0]), "category_id": int(r[6]),
             "bbox": [float(r[1]), float(r[2]), float(r[3]), float(r[4])], "score": float(r[5])}
            for r in rows]

  def threshold_report(self, threshold: float, iou: float = 0.5) -> dict[str, int]:
    """What the pictures at `threshold` show: the detections scored >= threshold, matched greedily
    per image in descending score to the non-crowd ground truth of their class (IoU >= `iou`).

    Returns {"detections", "true_positives", "duplicates" (a detection whose best same-class
    ground truth at IoU >= iou was already taken by a higher-scored one: the same object found
    again), "duplicate_images" (images with at least one), "false_positives" (the other unmatched
    ones), "missed" (non-crowd ground truth matched by none)}. A detection on a crowd region
    counts in none of them but "detections".
    """
    boxes_by_image: dict[int, list] = {image["id"]: [] for image in self._images}
    for ann in self._annotations:
      boxes_by_image[ann["image_id"]].append(ann)
    report = dict.fromkeys(("detections", "true_positives", "duplicates", "duplicate_images",
                            "false_positives", "missed"), 0)
    rows = (np.concatenate(self._detections, axis=0) if self._detections
            else np.zeros((0, 7)))
    rows = rows[rows[:, 5] >= threshold]
    for image_id, anns in boxes_by_image.items():
      dets = rows[rows[:, 0] == image_id]
      dets = dets[np.argsort(-dets[:, 5], kind="stable")]
      gt = np.asarray([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
      gt_labels = np.asarray([a["category_id"] for a in anns])
      crowd = np.asarray([bool(a["iscrowd"]) for a in anns], bool)
      overlap = _iou_xywh(dets[:, 1:5], gt)  # [D, G]
      taken = np.zeros(len(anns), bool)
      duplicates = 0
      for d, det in enumerate(dets):
        same = (gt_labels == int(det[6])) & (overlap[d] >= iou)
        free = same & ~taken & ~crowd
        if free.any():
          taken[np.argmax(np.where(free, overlap[d], -1.0))] = True
          report["true_positives"] += 1
        elif (same & taken).any():
          duplicates += 1
        elif not (same & crowd).any():
          report["false_positives"] += 1
      report["detections"] += len(dets)
      report["duplicates"] += duplicates
      report["duplicate_images"] += int(duplicates > 0)
      report["missed"] += int(np.sum(~taken & ~crowd))
    return report

  def compute(self) -> dict[str, float]:
    """Returns {AP, AP50, AP75, APs, APm, APl} (fractions in [0, 1]) from pycocotools."""
    if not self._images:
      raise ValueError("No valid evaluation images were added.")
    ground_truth = coco.COCO()
    ground_truth.dataset = self.ground_truth()
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


def _iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[len(a), len(b)] IoU of boxes given as [x, y, w, h]."""
  a0, a1 = a[:, None, :2], a[:, None, :2] + a[:, None, 2:]
  b0, b1 = b[None, :, :2], b[None, :, :2] + b[None, :, 2:]
  inter = np.prod(np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None), axis=-1)
  union = np.prod(a[:, None, 2:], axis=-1) + np.prod(b[None, :, 2:], axis=-1) - inter
  return inter / np.maximum(union, 1e-12)


make_predict_fn = inference.make_predict_fn  # re-exported


def local_view(variables, mesh):
  """(variables, mesh) on this process's devices only, for process-local prediction.

  Eval batches differ in number and shape between processes (each holds images of one padded
  shape), so prediction runs on each process's own devices, and the results are gathered once at
  the end. Replicated variables are copied from this process's replica.
  """
  if jax.process_count() == 1:
    return variables, mesh
  local_mesh = parallel.create_mesh(jax.local_devices())
  def to_local(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = np.asarray(x.addressable_data(0))
    return x
  local = jax.tree.map(to_local, variables)
  return jax.device_put(local, parallel.replicated(local_mesh)), local_mesh


def predict_batches(config, model, variables, mesh) -> Iterator[tuple[dict, tuple]]:
  """Yields (local numpy eval batch, (scores, labels, boxes) of its rows) over this process's
  shard of the eval split, predicted on this process's devices."""
  from detr_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  variables, mesh = local_view(variables, mesh)
  predict = inference.make_predict_fn(model, mesh, inference.label_activation(config))
  for local in input_pipeline.create_eval_iterator(config):
    inputs = input_pipeline.make_global_batch(
        {"images": local["images"], "pixel_mask": local["pixel_mask"],
         "orig_size": np.asarray(local["orig_size"], np.int32)}, mesh)
    outs = predict(variables, inputs["images"], inputs["pixel_mask"], inputs["orig_size"])
    yield local, tuple(parallel.to_host(o, mesh) for o in outs)


def _gather_processes(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Concatenates every process's rows (processes may hold different numbers of rows)."""
  if jax.process_count() == 1:
    return rows
  count = next(iter(rows.values())).shape[0]
  counts = np.asarray(multihost_utils.process_allgather(np.asarray([count], np.int64)))
  counts = counts.reshape(-1)
  most = int(counts.max())
  padded = {k: np.pad(v, [(0, most - count)] + [(0, 0)] * (v.ndim - 1)) for k, v in rows.items()}
  gathered = multihost_utils.process_allgather(padded, tiled=False)  # [processes, most, ...]
  return {k: np.concatenate([np.asarray(v)[p, :int(n)] for p, n in enumerate(counts)])
          for k, v in gathered.items()}


def evaluate_coco(config, model, variables, mesh, class_names: dict[int, str],
                  output_dir: str | None = None) -> dict[str, float]:
  """Runs the model over the eval split of every process and returns COCO box AP metrics.

  Every process predicts its shard, then gathers all predictions (they are small: queries x 6
  numbers per image) and computes the same metrics, so any process may log them. With
  `output_dir`, the first process writes there `metrics.json` and `detections.json` (the COCO
  results format, exactly the detections scored: every query of every image, no threshold).
  """
  parts = []
  for local, (scores, labels, boxes) in predict_batches(config, model, variables, mesh):
    keep = np.flatnonzero(np.asarray(local["example_valid"]))
    row = {k: np.asarray(local[k])[keep] for k in _GT_KEYS}
    row.update(scores=np.asarray(scores)[keep], labels=np.asarray(labels)[keep],
               boxes=np.asarray(boxes)[keep])
    parts.append(row)
  if not parts:
    raise ValueError("The eval split gave no batch.")
  rows = _gather_processes({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  # Images in id order: the metrics and detections.json do not depend on the batching.
  order = np.argsort(rows["image_id"], kind="stable")
  rows = {k: v[order] for k, v in rows.items()}
  evaluator = CocoEvaluator(class_names)
  evaluator.add_batch({k: rows[k] for k in _GT_KEYS}, rows["scores"], rows["labels"],
                      rows["boxes"])
  metrics = evaluator.compute()
  logging.info("Evaluated %d images: %s", evaluator.num_images,
               json.dumps({k: round(v, 4) for k, v in metrics.items()}))
  threshold = float(config.get("visualization_threshold", 0.5))
  report = evaluator.threshold_report(threshold)
  logging.info("At score >= %g (the drawing threshold): %s", threshold, json.dumps(report))
  metrics.update({"duplicates": float(report["duplicates"]),
                  "duplicate_images": float(report["duplicate_images"])})
  if output_dir and jax.process_index() == 0:
    write_results(output_dir, metrics, evaluator.detections())
  return metrics


def write_results(output_dir: str, metrics: dict[str, float], detections: list[dict]) -> None:
  """Writes `metrics.json` and `detections.json` (COCO results format) into `output_dir`."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  out = epath.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
  (out / "detections.json").write_text(json.dumps(detections))
  logging.info("Wrote %d detections and the metrics to %s.", len(detections), out)


def load_variables_for_eval(path: str) -> dict[str, Any]:
  """`checkpointing.load_variables`: {"params", "batch_stats"} of a workdir or converted dir."""
  from detr_jax import checkpointing  # pylint: disable=g-import-not-at-top
  return checkpointing.load_variables(path)


def run(config: ml_collections.ConfigDict, checkpoint: str,
        output_dir: str | None = None) -> dict[str, float]:
  """Evaluates the weights in `checkpoint` on `config`'s eval split; returns the metrics.

  With `output_dir`, also writes `metrics.json` and `detections.json` there (`evaluate_coco`).
  """
  from detr_jax import models  # pylint: disable=g-import-not-at-top
  from detr_jax import config_checks  # pylint: disable=g-import-not-at-top
  from detr_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  config_checks.check_eval_config(config)
  if "://" not in checkpoint and not os.path.exists(checkpoint):
    raise config_checks.ConfigError(
        f"--checkpoint={checkpoint} does not exist: give a training workdir, its checkpoints "
        "folder or a `python -m detr_jax.convert` output.")
  info = input_pipeline.dataset_info(config.dataset)
  config = input_pipeline.resolve_config(config, info)
  mesh = parallel.create_mesh()
  model = models.build_model(config.model)
  variables = load_variables_for_eval(checkpoint)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.device_put(variables, replicated)
  return evaluate_coco(config, model, variables, mesh, info.class_names, output_dir)


def default_output_dir(checkpoint: str) -> str:
  """Where `python -m detr_jax.evaluate` writes its results by default: CHECKPOINT/eval."""
  return str(checkpoint).rstrip("/") + "/eval"


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  output_dir = flags.FLAGS.output_dir or default_output_dir(flags.FLAGS.checkpoint)
  metrics = run(flags.FLAGS.config, flags.FLAGS.checkpoint, output_dir)
  print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=1))
  print(f"Detections (COCO results format) and metrics written to {output_dir}/detections.json "
        "and metrics.json", file=sys.stderr)


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                  lock_config=False)
  flags.DEFINE_string("checkpoint", None, "Training workdir, its checkpoints dir, or a "
                      "converted checkpoint dir.")
  flags.DEFINE_string("output_dir", "", "Where to write metrics.json and detections.json "
                      "(default: CHECKPOINT/eval).")
  flags.mark_flags_as_required(["config", "checkpoint"])
  from detr_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
