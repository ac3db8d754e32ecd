"""Tests of detr_jax.evaluate: post-processing and COCO AP through pycocotools."""

import json

import numpy as np
import pytest

from detr_jax import evaluate

CLASS_NAMES = {0: "circle", 1: "square", 2: "triangle"}


def test_postprocess_matches_numpy_closed_form():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 4)).astype(np.float32) * 3  # 3 classes + no-object
  boxes = rng.uniform(0.1, 0.9, size=(2, 5, 4)).astype(np.float32)
  orig_size = np.array([[480, 640], [100, 50]], np.int32)  # (h, w)
  scores, labels, xyxy = map(np.asarray, evaluate.postprocess(logits, boxes, orig_size))

  prob = np.exp(logits - logits.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  np.testing.assert_allclose(scores, prob[..., :3].max(-1), rtol=1e-5)
  np.testing.assert_array_equal(labels, prob[..., :3].argmax(-1))
  for b in range(2):
    h, w = orig_size[b]
    for q in range(5):
      cx, cy, bw, bh = boxes[b, q]
      expected = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
      np.testing.assert_allclose(xyxy[b, q], expected, rtol=1e-5, atol=1e-4)


def test_postprocess_sigmoid_scores_real_classes_only():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 4)).astype(np.float32) * 3
  logits[..., -1] = 50.0  # the no-object logit must not matter for sigmoid-trained models
  boxes = rng.uniform(0.1, 0.9, size=(2, 5, 4)).astype(np.float32)
  orig_size = np.array([[480, 640], [100, 50]], np.int32)
  scores, labels, _ = map(np.asarray, evaluate.postprocess(logits, boxes, orig_size, "sigmoid"))
  prob = 1.0 / (1.0 + np.exp(-logits[..., :3]))
  np.testing.assert_allclose(scores, prob.max(-1), rtol=1e-5)
  np.testing.assert_array_equal(labels, prob.argmax(-1))
  with pytest.raises(ValueError, match="activation"):
    evaluate.postprocess(logits, boxes, orig_size, "softplus")


def _eval_batch(rng, image_ids, num_boxes, m=6, filler=0):
  """An eval batch with the input pipeline's eval fields: random xywh ground truth in original pixels."""
  b = len(image_ids) + filler
  orig = np.stack([rng.integers(200, 400, b), rng.integers(200, 400, b)], -1).astype(np.int32)
  xy = rng.uniform(0, 100, (b, m, 2))
  wh = rng.uniform(20, 100, (b, m, 2))
  gt_valid = np.arange(m)[None] < np.asarray(list(num_boxes) + [m] * filler)[:, None]
  return {
      "image_id": np.asarray(list(image_ids) + [0] * filler, np.int64),
      "orig_size": orig,
      "example_valid": np.arange(b) < len(image_ids),
      "gt_boxes": np.concatenate([xy, wh], -1).astype(np.float32),
      "gt_labels": rng.integers(0, 3, (b, m)).astype(np.int32),
      "gt_is_crowd": np.zeros((b, m), bool),
      "gt_area": (wh[..., 0] * wh[..., 1]).astype(np.float32),
      "gt_valid": gt_valid,
  }


def _gt_as_detections(batch, num_queries=8):
  """Ground truth as detections (score 1), padded with low-score junk queries."""
  b, m = batch["gt_labels"].shape
  scores = np.full((b, num_queries), 1e-3, np.float32)
  labels = np.zeros((b, num_queries), np.int32)
  boxes = np.tile(np.array([0, 0, 5, 5], np.float32), (b, num_queries, 1))
  scores[:, :m] = np.where(batch["gt_valid"], 1.0, 1e-3)
  labels[:, :m] = batch["gt_labels"]
  xywh = batch["gt_boxes"]
  boxes[:, :m] = np.where(batch["gt_valid"][..., None],
                          np.concatenate([xywh[..., :2], xywh[..., :2] + xywh[..., 2:]], -1),
                          boxes[:, :m])
  return scores, labels, boxes


def test_ground_truth_as_predictions_gives_ap_one():
  rng = np.random.default_rng(1)
  evaluator = evaluate.CocoEvaluator(CLASS_NAMES)
  batches = [_eval_batch(rng, [1, 2, 3], [2, 6, 1]), _eval_batch(rng, [4, 5], [3, 0], filler=2)]
  batches[1]["gt_is_crowd"][0, 2] = True  # a crowd box must not count as a miss
  for batch in batches:
    evaluator.add_batch(batch, *_gt_as_detections(batch))
  assert evaluator.num_images == 5  # filler rows ignored
  metrics = evaluator.compute()
  assert set(metrics) == set(evaluate.METRIC_NAMES)
  for name in ("AP", "AP50", "AP75"):
    assert metrics[name] == pytest.approx(1.0), name


def test_threshold_report_counts_duplicates_by_hand():
  """Image 1: ground truth A (class 0) and B (class 1), crowd C (class 2). Detections: A found
  twice (0.9 and 0.8: one duplicate), A's box with class 1 (0.7: wrong class, a false positive),
  a box on C (0.6: counts as neither), B below the threshold (0.3: B missed). Image 2: nothing
  detected, one ground truth missed."""
  evaluator = evaluate.CocoEvaluator(CLASS_NAMES)
  gt = np.zeros((2, 3, 4), np.float32)
  gt[0] = [[10, 10, 40, 40], [100, 100, 30, 30], [200, 10, 50, 50]]
  gt[1, 0] = [5, 5, 20, 20]
  batch = {"image_id": np.asarray([1, 2]), "orig_size": np.full((2, 2), 300, np.int32),
           "example_valid": np.ones(2, bool), "gt_boxes": gt,
           "gt_labels": np.asarray([[0, 1, 2], [0, 0, 0]], np.int32),
           "gt_is_crowd": np.asarray([[False, False, True], [False, False, False]]),
           "gt_area": gt[..., 2] * gt[..., 3],
           "gt_valid": np.asarray([[True, True, True], [True, False, False]])}
  xyxy = lambda x, y, w, h: [x, y, x + w, y + h]
  boxes = np.zeros((2, 5, 4), np.float32)
  boxes[0] = [xyxy(10, 10, 40, 40), xyxy(12, 11, 40, 38), xyxy(10, 10, 40, 40),
              xyxy(200, 10, 50, 50), xyxy(100, 100, 30, 30)]
  scores = np.asarray([[0.9, 0.8, 0.7, 0.6, 0.3], [0.1] * 5], np.float32)
  labels = np.asarray([[0, 0, 1, 2, 1], [0] * 5], np.int32)
  evaluator.add_batch(batch, scores, labels, boxes)
  assert evaluator.threshold_report(0.5) == {
      "detections": 4, "true_positives": 1, "duplicates": 1, "duplicate_images": 1,
      "false_positives": 1, "missed": 2}
  # At 0.25, B is found too; at 0.85 only the best detection of A is drawn.
  assert evaluator.threshold_report(0.25)["missed"] == 1
  assert evaluator.threshold_report(0.85) == {
      "detections": 1, "true_positives": 1, "duplicates": 0, "duplicate_images": 0,
      "false_positives": 0, "missed": 2}


def test_shifted_predictions_lower_ap():
  rng = np.random.default_rng(2)
  batch = _eval_batch(rng, [1, 2, 3, 4], [4, 4, 4, 4])
  scores, labels, boxes = _gt_as_detections(batch)
  # Shift half of the boxes by their own width: IoU 0 for those, AP50 close to 0.5.
  width = boxes[..., 2:3] - boxes[..., 0:1]
  shift = np.where(np.arange(8) % 2 == 0, 1.0, 0.0)[None, :, None] * width
  boxes = boxes + shift * np.array([1, 0, 1, 0], np.float32)
  evaluator = evaluate.CocoEvaluator(CLASS_NAMES)
  evaluator.add_batch(batch, scores, labels, boxes)
  metrics = evaluator.compute()
  assert 0.2 < metrics["AP50"] < 0.8


def test_filler_rows_and_missing_fields():
  rng = np.random.default_rng(3)
  batch = _eval_batch(rng, [7], [2], filler=3)
  evaluator = evaluate.CocoEvaluator(CLASS_NAMES)
  evaluator.add_batch(batch, *_gt_as_detections(batch))
  assert evaluator.num_images == 1
  del batch["gt_area"]
  with pytest.raises(ValueError, match="gt_area"):
    evaluator.add_batch(batch, *_gt_as_detections(batch))
  with pytest.raises(ValueError, match="No valid evaluation images"):
    evaluate.CocoEvaluator(CLASS_NAMES).compute()


def test_detections_are_what_was_scored_in_the_coco_results_format(tmp_path):
  """`detections()` rescored by pycocotools independently gives the same metrics."""
  rng = np.random.default_rng(4)
  batch = _eval_batch(rng, [1, 2, 3, 4], [4, 2, 3, 1])
  scores, labels, boxes = _gt_as_detections(batch)
  boxes = boxes + rng.normal(0, 1.5, boxes.shape).astype(np.float32)  # imperfect: AP < 1
  evaluator = evaluate.CocoEvaluator(CLASS_NAMES)
  evaluator.add_batch(batch, scores, labels, boxes)
  metrics = evaluator.compute()
  assert 0 < metrics["AP"] < 1
  evaluate.write_results(str(tmp_path / "out"), metrics, evaluator.detections())
  detections = json.loads((tmp_path / "out" / "detections.json").read_text())
  assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics
  assert len(detections) == 4 * 8  # every query of every image
  assert set(detections[0]) == {"image_id", "category_id", "bbox", "score"}
  # Box 0 of image 1 in xywh, as given (xyxy) to add_batch.
  first = detections[0]
  x0, y0, x1, y1 = boxes[0, 0]
  assert first["image_id"] == 1 and first["category_id"] == labels[0, 0]
  np.testing.assert_allclose(first["bbox"], [x0, y0, x1 - x0, y1 - y0], rtol=1e-6)
  assert metrics == rescore(evaluator.ground_truth(), detections)


def rescore(ground_truth: dict, detections: list) -> dict[str, float]:
  """COCO box AP of a results list, straight from pycocotools."""
  from pycocotools import coco, cocoeval  # pylint: disable=g-import-not-at-top
  gt = coco.COCO()
  gt.dataset = ground_truth
  gt.createIndex()
  scored = cocoeval.COCOeval(gt, gt.loadRes(detections), iouType="bbox")
  scored.evaluate()
  scored.accumulate()
  scored.summarize()
  return dict(zip(evaluate.METRIC_NAMES, map(float, scored.stats[:6])))
