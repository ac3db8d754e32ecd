"""COCO 2017 detection from TFDS (`coco/2017`), with labels in the 91-id space of DETR's weights.

TFDS stores the label as the index (0..79) of the category in the instances JSON (sorted by id),
while the official DETR head (91 classes + no-object) predicts the COCO category id itself.
`decode_example` maps index -> id with this table (pycocotools' `getCatIds()` of the 2017 files):

| TFDS index | COCO ids        | TFDS index | COCO ids        |
|------------|-----------------|------------|-----------------|
| 0..10      | 1..11           | 59         | 67              |
| 11..23     | 13..25          | 60         | 70              |
| 24..25     | 27..28          | 61..71     | 72..82          |
| 26..39     | 31..44          | 72..78     | 84..90          |
| 40..59     | 46..65          |            |                 |

i.e. ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 and 0 are never used; `num_classes` = 91.
Boxes: TFDS keeps normalised (ymin, xmin, ymax, xmax); they become xyxy pixels of the image.
TFDS rounds COCO's "area" to an integer (only the eval area ranges use it).

The dataset is not downloaded here (about 20 GB): prepare it once with
`tfds build coco/2017 --data_dir DIR` and set config.dataset.data_dir=DIR.
"""

import os

import tensorflow as tf
import tensorflow_datasets as tfds

from detr_jax.data import features

# COCO category ids of the 80 used categories, in the order of TFDS's label index.
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90)
COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
NUM_CLASSES = max(COCO_CATEGORY_IDS) + 1  # 91


def class_names() -> dict:
  """{COCO category id: name} of the 80 used categories."""
  return dict(zip(COCO_CATEGORY_IDS, COCO_CLASS_NAMES))


def label_to_category_id(label):
  """TFDS coco label index (0..79, tensor) -> COCO category id (1..90)."""
  table = tf.constant(COCO_CATEGORY_IDS, tf.int32)
  return tf.gather(table, tf.cast(label, tf.int32))


def _normalised_to_pixels(bbox, height, width):
  """TFDS BBox (ymin, xmin, ymax, xmax) in [0, 1] -> float32 xyxy in pixels."""
  bbox = tf.reshape(tf.cast(bbox, tf.float32), [-1, 4])
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  return tf.stack([bbox[:, 1] * w, bbox[:, 0] * h, bbox[:, 3] * w, bbox[:, 2] * h], axis=-1)


def decode_example(raw):
  """coco/2017 record (image still encoded) -> the pipeline's common example layout."""
  image = features.decode_image(raw["image"])
  objects = raw["objects"]
  return {
      "image": image,
      "image_id": tf.cast(raw["image/id"], tf.int64),
      "boxes": _normalised_to_pixels(objects["bbox"], tf.shape(image)[0], tf.shape(image)[1]),
      "labels": label_to_category_id(objects["label"]),
      "is_crowd": tf.cast(objects["is_crowd"], tf.bool),
      "area": tf.cast(objects["area"], tf.float32),
  }


# TFDS coco boxes are (ymin, xmin, ymax, xmax): the same "max > min on both axes" test applies.
has_training_boxes = features.has_training_boxes


def builder(ds_config) -> tfds.core.DatasetBuilder:
  """The prepared coco/2017 builder in config.dataset.data_dir.

  Raises:
    ValueError: the dataset is not prepared there, or its label names are not the 80 COCO
      categories in id order (then the id table above would be wrong for it).
  """
  coco_builder = tfds.builder("coco/2017", data_dir=ds_config.get("data_dir"))
  if not tf.io.gfile.exists(os.path.join(coco_builder.data_dir, "dataset_info.json")):
    raise ValueError(
        f"coco/2017 is not prepared in {coco_builder.data_dir}. Download COCO 2017 and run "
        "`tfds build coco/2017 --data_dir DIR` once, then set config.dataset.data_dir=DIR "
        "(or use config.dataset.name='coco_folder' with the instances JSON and image folders).")
  check_label_names(coco_builder.info.features["objects"]["label"].names)
  return coco_builder


def check_label_names(names) -> None:
  """Raises ValueError unless names are the 80 COCO category names in id order."""
  if [str(n).replace("_", " ") for n in names] != list(COCO_CLASS_NAMES):
    raise ValueError(f"Label names {list(names)[:5]}... are not the 80 COCO categories in id "
                     "order, so the TFDS index -> COCO id table does not apply.")

