"""An image's detections do not depend on its batch: AP is the same for any eval batch size and
any device count.

A tiny DETR runs on a COCO-format folder whose images have different sizes (so a batch-dependent
padding would pad them differently, which moves every output of the model) with eval batch sizes
1, 3 and 8 on one device and 8 on 8 fake devices, in both `config.dataset.eval_padding` modes.
Every query's score and box of every image must agree, and so must the AP: the COCO AP of the
dataset's ground truth and, since an untrained model scores ~0 there, also the AP against a ground
truth made of the batch-1 run's three best detections per image (close to 1 for that run).
"""

import json

import jax
import ml_collections
import numpy as np
import pytest

import coco_folder_testdata as testdata
from configs import tiny_test
from detr_jax import evaluate
from detr_jax import models
from detr_jax import parallel
from detr_jax import predict
from detr_jax import train
from detr_jax.data import input_pipeline


def _folder_config(root, train_split, eval_split):
  config = tiny_test.get_config()
  folder = testdata.config(str(root), train_split, eval_split).dataset
  for key in ("name", "data_dir", "train_split", "eval_split", "annotations_file", "images_dir",
              "eval_annotations_file", "eval_images_dir", "eval_size", "eval_max_size"):
    config.dataset[key] = folder[key]
  config.dataset.scales = (64,)
  config.dataset.max_size = 96
  config.dataset.buckets = ((64, 64), (64, 96), (96, 64), (96, 96))
  config.model.num_classes = -1
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  train_split = testdata.write_split(str(root), "train", testdata.TRAIN_IMAGES)
  eval_split = testdata.write_split(str(root), "val", testdata.EVAL_IMAGES * 2, first_id=100)
  config = _folder_config(root, train_split, eval_split)
  info = input_pipeline.dataset_info(config.dataset)
  config = train.resolve_config(config, info)
  variables = train.init_variables(config, models.build_model(config.model),
                                   jax.random.PRNGKey(5))
  return config, jax.device_get(variables), info.class_names


_RUNS = {}


def _evaluate(config, variables, class_names, batch_size, num_devices, output_dir, **dataset):
  """evaluate_coco's metrics and its detections.json as {image_id: (size, scores, labels, boxes)}
  (each setting is run once per pytest run)."""
  key = (batch_size, num_devices, tuple(sorted(dataset.items())))
  if key not in _RUNS:
    _RUNS[key] = _run_evaluation(config, variables, class_names, batch_size, num_devices,
                                 output_dir, **dataset)
  return _RUNS[key]


def _run_evaluation(config, variables, class_names, batch_size, num_devices, output_dir,
                    **dataset):
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval_batch_size = batch_size
  config.dataset.update(dataset)
  mesh = parallel.create_mesh(jax.devices()[:num_devices])
  model = models.build_model(config.model)
  metrics = evaluate.evaluate_coco(config, model, variables, mesh, class_names, str(output_dir))
  with open(output_dir / "detections.json") as f:
    detections = json.load(f)
  rows = {}
  for d in detections:  # every query of every image, in query order
    rows.setdefault(d["image_id"], []).append(d)
  orig = {int(i): s for i, s in zip(*_original_sizes(config))}
  out = {}
  for image_id, ds in rows.items():
    x, y, w, h = np.asarray([d["bbox"] for d in ds]).T
    out[image_id] = (orig[image_id], np.asarray([d["score"] for d in ds]),
                     np.asarray([d["category_id"] for d in ds]), np.stack([x, y, x + w, y + h], -1))
  return metrics, out


def _original_sizes(config):
  ids, sizes = [], []
  for batch in input_pipeline.create_eval_iterator(config, 0, 1):
    for i in np.flatnonzero(batch["example_valid"]):
      ids.append(batch["image_id"][i])
      sizes.append(batch["orig_size"][i])
  return ids, sizes


def _ap_against(reference, rows, class_names, best=3):
  """COCO AP of rows' detections against the reference run's `best` detections per image."""
  evaluator = evaluate.CocoEvaluator(class_names)
  for image_id, (orig_size, scores, labels, boxes) in sorted(rows.items()):
    _, ref_scores, ref_labels, ref_boxes = reference[image_id]
    top = np.argsort(-ref_scores, kind="stable")[:best]
    xyxy = ref_boxes[top]
    fields = {
        "image_id": np.asarray([image_id]), "orig_size": np.asarray([orig_size]),
        "example_valid": np.asarray([True]),
        "gt_boxes": np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], -1)[None],
        "gt_labels": ref_labels[top][None], "gt_is_crowd": np.zeros([1, best], bool),
        "gt_area": np.prod(xyxy[:, 2:] - xyxy[:, :2], -1)[None],
        "gt_valid": np.ones([1, best], bool)}
    evaluator.add_batch(fields, scores[None], labels[None], boxes[None])
  return evaluator.compute()


@pytest.mark.parametrize("padding, runs", [
    (dict(eval_padding="bucket"), ((1, 1), (3, 1), (8, 1), (8, 8))),
    (dict(eval_padding="image", eval_pad_multiple=8), ((1, 1), (3, 1), (8, 8))),
])
def test_ap_and_detections_do_not_depend_on_the_batch(trained, padding, runs, tmp_path):
  config, variables, class_names = trained
  runs = {(b, d): _evaluate(config, variables, class_names, b, d, tmp_path / f"{b}_{d}", **padding)
          for b, d in runs}
  reference_metrics, reference = runs[1, 1]
  assert len(reference) == len(testdata.EVAL_IMAGES) * 2
  reference_ap = _ap_against(reference, reference, class_names)
  assert reference_ap["AP50"] > 0.5, reference_ap
  for key, (metrics, rows) in runs.items():
    assert metrics == reference_metrics, key
    assert _ap_against(reference, rows, class_names) == reference_ap, key
    assert sorted(rows) == sorted(reference)
    for image_id, (_, scores, labels, boxes) in rows.items():
      np.testing.assert_allclose(scores, reference[image_id][1], atol=2e-5, err_msg=str(key))
      np.testing.assert_array_equal(labels, reference[image_id][2], err_msg=str(key))
      np.testing.assert_allclose(boxes, reference[image_id][3], atol=2e-3, err_msg=str(key))


def test_padding_moves_the_outputs(trained, tmp_path):
  """Why the padding must not depend on the batch: the same image padded to another shape gets
  other scores (the backbone sees the zeros), so a batch-dependent padding would be caught above.
  (64, 85) is padded to (64, 96) by its bucket and to (64, 88) at eval_pad_multiple=8."""
  config, variables, class_names = trained
  _, bucket = _evaluate(config, variables, class_names, 1, 1, tmp_path / "b",
                        eval_padding="bucket")
  _, image = _evaluate(config, variables, class_names, 1, 1, tmp_path / "i",
                       eval_padding="image", eval_pad_multiple=8)
  assert np.abs(bucket[100][1] - image[100][1]).max() > 1e-4


def test_each_image_gets_its_own_padded_shape(trained):
  config, _, _ = trained
  # Resized (eval_size 64, eval_max_size 96) sizes of testdata.EVAL_IMAGES.
  resized = [(64, 85), (96, 64), (64, 91), (64, 64), (64, 96)]
  bucket = {(64, 85): (64, 96), (96, 64): (96, 64), (64, 91): (64, 96), (64, 64): (64, 64),
            (64, 96): (64, 96)}
  for size in resized:
    assert input_pipeline.eval_padded_size(*size, config.dataset) == bucket[size]
  image_mode = ml_collections.ConfigDict(config.dataset.to_dict())
  image_mode.eval_padding, image_mode.eval_pad_multiple = "image", 32
  assert [input_pipeline.eval_padded_size(*s, image_mode) for s in resized] == [
      (64, 96), (96, 64), (64, 96), (64, 64), (64, 96)]
  image_mode.eval_pad_multiple = 8
  assert input_pipeline.eval_padded_size(64, 85, image_mode) == (64, 88)
  image_mode.eval_padding = "batch"
  with pytest.raises(ValueError, match="config.dataset.eval_padding='batch'"):
    input_pipeline.eval_padded_size(64, 85, image_mode)


def test_predict_pads_each_image_on_its_own(trained):
  """`Detector` gives an image the same detections alone or with others of other sizes."""
  config, variables, class_names = trained
  detector = predict.Detector(config, variables, class_names,
                              mesh=parallel.create_mesh(jax.devices()[:1]), batch_size=4)
  images = [testdata.draw(h, w, rects) for h, w, rects in testdata.EVAL_IMAGES]
  together = detector.run([detector.prepare(i) for i in images])
  for image, result in zip(images, together):
    alone = detector.run([detector.prepare(image)])[0]
    np.testing.assert_allclose(alone.scores, result.scores, atol=2e-5)
    np.testing.assert_allclose(alone.boxes, result.boxes, atol=2e-3)
