"""Tests of the data sources: shapes, coco label mapping, COCO-format folders and bad input."""

import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from detr_jax.data import coco
from detr_jax.data import input_pipeline
from detr_jax.data import shapes

import coco_folder_testdata as testdata


# ----------------------------------------------------------------------------- shapes


def _saturated(image):
  image = image.astype(np.int32)
  return image.max(-1) - image.min(-1) > 100  # class colours; the background is near grey


def test_shapes_generation_is_deterministic_and_seeded():
  first = shapes.generate_example(5, 0, 3, 64, 6)
  again = shapes.generate_example(5, 0, 3, 64, 6)
  other_seed = shapes.generate_example(6, 0, 3, 64, 6)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], other_seed[0])


def test_shapes_boxes_are_the_drawn_objects():
  for index in range(20):
    image, boxes, labels, _ = shapes.generate_example(0, 0, index, 96, 1)
    ys, xs = np.nonzero(_saturated(image))
    np.testing.assert_allclose(boxes[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1)
    assert 0 <= labels[0] < len(shapes.CLASS_NAMES)
    assert min(boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1]) >= 0.12 * 96
  for index in range(10):  # several objects: every coloured pixel lies in some box
    image, boxes, labels, _ = shapes.generate_example(0, 0, index, 96, 6)
    covered = np.zeros(image.shape[:2], bool)
    for x0, y0, x1, y1 in boxes.astype(int):
      covered[y0:y1, x0:x1] = True
    assert not np.any(_saturated(image) & ~covered)
    assert len(labels) == len(boxes) >= 1


def test_shapes_tfds_dataset(tmp_path):
  ds = ml_collections.ConfigDict(dict(name="shapes", data_dir=str(tmp_path), image_size=48,
                                      num_train_examples=6, num_eval_examples=4, max_objects=3))
  info = input_pipeline.dataset_info(ds)
  assert info.num_classes == len(shapes.CLASS_NAMES) == max(info.class_names) + 1
  assert (info.num_train_examples, info.num_eval_examples) == (6, 4)
  # Different sizes live side by side in one data_dir.
  ds.num_train_examples = 7
  assert input_pipeline.dataset_info(ds).num_train_examples == 7
  assert len([d for d in os.listdir(tmp_path / "detr_shapes") if d.startswith("s48_")]) == 2


# ----------------------------------------------------------------------------- coco


def test_coco_category_ids_are_the_80_coco_ids():
  ids = np.array(coco.COCO_CATEGORY_IDS)
  assert len(ids) == len(coco.COCO_CLASS_NAMES) == 80
  assert np.all(np.diff(ids) > 0) and ids.min() == 1 and ids.max() == 90
  assert coco.NUM_CLASSES == 91
  unused = sorted(set(range(1, 91)) - set(ids.tolist()))
  assert len(unused) == 10
  names = coco.class_names()
  # Anchors of the official label map (DETR's CLASSES list / pycocotools' loadCats).
  assert (names[1], names[44], names[67], names[90]) == ("person", "bottle", "dining table",
                                                          "toothbrush")


def test_coco_decode_maps_labels_and_boxes():
  height, width = 40, 80
  image = np.zeros([height, width, 3], np.uint8)
  raw = {
      "image": tf.io.encode_png(image),
      "image/id": tf.constant(139, tf.int64),
      "objects": {
          # TFDS BBox: ymin, xmin, ymax, xmax normalised.
          "bbox": tf.constant([[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.5, 0.25]], tf.float32),
          "label": tf.constant([0, 79], tf.int64),
          "is_crowd": tf.constant([False, True]),
          "area": tf.constant([800, 100], tf.int64),
      },
  }
  example = coco.decode_example(raw)
  np.testing.assert_array_equal(example["labels"], [1, 90])
  np.testing.assert_allclose(example["boxes"], [[40, 10, 80, 30], [0, 0, 20, 20]])
  assert int(example["image_id"]) == 139
  assert bool(coco.has_training_boxes(raw))
  raw["objects"]["is_crowd"] = tf.constant([True, True])
  assert not bool(coco.has_training_boxes(raw))
  with pytest.raises(ValueError, match="not the 80 COCO categories"):
    coco.check_label_names(["cat"] * 80)
  coco.check_label_names([n.replace(" ", "_") for n in coco.COCO_CLASS_NAMES])


def test_coco_not_prepared_is_a_clear_error(tmp_path):
  ds = ml_collections.ConfigDict(dict(name="coco", data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="tfds build coco/2017"):
    input_pipeline.dataset_info(ds)


# ----------------------------------------------------------------------------- coco_folder


@pytest.fixture
def folder(tmp_path):
  train = testdata.write_split(str(tmp_path), "train", testdata.TRAIN_IMAGES)
  evaluation = testdata.write_split(str(tmp_path), "val", testdata.EVAL_IMAGES, first_id=100)
  return tmp_path, train, evaluation


def _eval_examples(config):
  examples = []
  for batch in input_pipeline.create_eval_iterator(config, 0, 1):
    for i in np.nonzero(batch["example_valid"])[0]:
      examples.append({k: v[i] for k, v in batch.items()})
  return examples


def test_coco_folder_loads_boxes_labels_names(folder):
  root, train, evaluation = folder
  config = testdata.config(str(root), train, evaluation)
  info = input_pipeline.dataset_info(config.dataset)
  assert info.class_names == {c["id"]: c["name"] for c in testdata.CATEGORIES}
  assert info.num_classes == 8
  assert (info.num_train_examples, info.num_eval_examples) == (6, 5)
  examples = _eval_examples(config)
  assert sorted(int(e["image_id"]) for e in examples) == list(range(100, 105))
  for example in examples:
    height, width, rects = testdata.EVAL_IMAGES[int(example["image_id"]) - 100]
    assert tuple(example["orig_size"]) == (height, width)
    n = len(rects)
    np.testing.assert_allclose(example["gt_boxes"][:n], [r[:4] for r in rects])
    np.testing.assert_array_equal(example["gt_labels"][:n], [r[4] for r in rects])
    assert example["gt_valid"].sum() == example["valid"].sum() == n
    # Training-style targets: the same boxes, cxcywh normalised by the image size.
    x, y, w, h = np.array([r[:4] for r in rects], np.float32).T
    expected = np.stack([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height], -1)
    order = np.argsort(example["labels"][:n])
    np.testing.assert_allclose(example["boxes"][:n][order],
                               expected[np.argsort(example["gt_labels"][:n])], atol=1e-5)


def test_two_folders_do_not_collide(tmp_path):
  first = testdata.write_split(str(tmp_path / "a"), "train", testdata.TRAIN_IMAGES)
  second = testdata.write_split(str(tmp_path / "b"), "train", testdata.TRAIN_IMAGES[:4])
  shared_dir = str(tmp_path / "tfds")
  counts = []
  for split in (first, second):
    config = testdata.config(str(tmp_path), split)
    config.dataset.data_dir = shared_dir
    counts.append(input_pipeline.dataset_info(config.dataset).num_train_examples)
  assert counts == [6, 4]


# ----------------------------------------------------------------------------- bad input


def test_unknown_category_names_the_annotation(folder):
  root, train, evaluation = folder
  testdata.edit_json(evaluation[0], lambda d: d["annotations"][1].update(category_id=42))
  config = testdata.config(str(root), train, evaluation)
  with pytest.raises(ValueError, match=r"annotation id 2 has category_id 42"):
    input_pipeline.dataset_info(config.dataset)


def test_missing_image_names_the_file(folder):
  root, train, _ = folder
  os.remove(os.path.join(train[1], "000003.jpg"))
  with pytest.raises(ValueError, match="000003.jpg"):
    input_pipeline.dataset_info(testdata.config(str(root), train).dataset)


def test_corrupt_image_is_skipped_and_counted(folder):
  root, train, _ = folder
  with open(os.path.join(train[1], "000002.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
  config = testdata.config(str(root), train)
  info = input_pipeline.dataset_info(config.dataset)
  assert info.num_train_examples == 5
  from detr_jax.data import coco_folder  # pylint: disable=g-import-not-at-top
  report = coco_folder.builder(config.dataset).info.metadata["report"]["train"]
  assert report["corrupt_images"] == 1


def test_bad_boxes_are_clipped_or_dropped_and_counted(folder):
  root, train, evaluation = folder

  def damage(data):
    data["annotations"][0]["bbox"] = [-4, 30, 20, 30]  # image 100 is 48 x 64: clipped
    data["annotations"][1]["bbox"] = [4, 10, -3, 12]  # negative width: dropped
  testdata.edit_json(evaluation[0], damage)
  config = testdata.config(str(root), train, evaluation)
  from detr_jax.data import coco_folder  # pylint: disable=g-import-not-at-top
  report = coco_folder.builder(config.dataset).info.metadata["report"]["validation"]
  assert (report["clipped_boxes"], report["negative_size_boxes"]) == (1, 1)
  examples = {int(e["image_id"]): e for e in _eval_examples(config)}
  np.testing.assert_allclose(examples[100]["gt_boxes"][0], [0, 30, 16, 18])
  np.testing.assert_allclose(examples[101]["gt_boxes"][0], [10, 30, 20, 20])  # 2nd box left
  assert examples[101]["gt_valid"].sum() == 1


def test_image_without_annotations_kept_for_eval_only(folder):
  root, train, evaluation = folder
  drop_image_1 = lambda d: d.update(annotations=[a for a in d["annotations"]
                                                 if a["image_id"] not in (1, 100)])
  testdata.edit_json(train[0], drop_image_1)
  testdata.edit_json(evaluation[0], drop_image_1)
  info = input_pipeline.dataset_info(testdata.config(str(root), train, evaluation).dataset)
  assert (info.num_train_examples, info.num_eval_examples) == (5, 5)


def test_empty_split_is_an_error(folder):
  root, train, _ = folder
  testdata.edit_json(train[0], lambda d: d.update(annotations=[]))
  with pytest.raises(ValueError, match="empty split"):
    input_pipeline.dataset_info(testdata.config(str(root), train).dataset)
  testdata.edit_json(train[0], lambda d: d.update(images=[]))
  with pytest.raises(ValueError, match="lists no images"):
    input_pipeline.dataset_info(testdata.config(str(root), train).dataset)


def test_unknown_dataset_name_is_an_error():
  with pytest.raises(ValueError, match="is not a dataset"):
    input_pipeline.dataset_info(ml_collections.ConfigDict(dict(name="imagenet")))
