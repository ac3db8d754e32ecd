"""Writes tiny COCO-format folders (JPEGs of filled rectangles + instances JSON) for the tests.

Every rectangle has its own colour, so a test can find it again in an augmented image.
"""

import json
import os

import ml_collections
import numpy as np
from PIL import Image

BACKGROUND = (120, 120, 120)
CATEGORIES = [{"id": 1, "name": "red thing"}, {"id": 3, "name": "blue thing"},
              {"id": 7, "name": "green thing"}]

# (height, width, [(x, y, w, h, category id, colour), ...]) per image.
TRAIN_IMAGES = [
    (48, 64, [(4, 6, 20, 14, 1, (250, 10, 10)), (40, 20, 18, 22, 3, (10, 10, 250))]),
    (64, 48, [(10, 30, 16, 16, 7, (10, 240, 10))]),
    (40, 40, [(2, 2, 12, 30, 1, (250, 240, 10))]),
    (56, 72, [(30, 10, 30, 20, 3, (10, 240, 240)), (5, 35, 10, 12, 7, (240, 10, 240))]),
    (64, 64, [(20, 20, 24, 24, 1, (250, 130, 10))]),
    (36, 60, [(40, 4, 14, 28, 7, (130, 10, 250))]),
]
EVAL_IMAGES = [
    (48, 64, [(8, 8, 20, 20, 3, (250, 10, 10))]),
    (60, 40, [(4, 10, 30, 12, 1, (10, 250, 10)), (10, 30, 20, 20, 7, (10, 10, 250))]),
    (40, 56, [(6, 6, 40, 24, 7, (250, 250, 10))]),
    (52, 52, [(12, 12, 16, 30, 3, (10, 250, 250))]),
    (44, 66, [(1, 1, 20, 20, 1, (250, 10, 250))]),
]


def draw(height, width, rects):
  """uint8 [h, w, 3] image with the filled rectangles on a grey background."""
  image = np.empty([height, width, 3], np.uint8)
  image[:] = BACKGROUND
  for x, y, w, h, _, colour in rects:
    image[y:y + h, x:x + w] = colour
  return image


def write_split(root, name, images, first_id=1, crowd=()):
  """Writes <root>/<name>/ (JPEGs) and <root>/<name>.json; returns (json path, images dir).

  Args:
    root: parent directory.
    name: split name.
    images: list of (height, width, rects).
    first_id: id of the first image (ids are consecutive).
    crowd: annotation ids to mark iscrowd=1.
  """
  images_dir = os.path.join(root, name)
  os.makedirs(images_dir, exist_ok=True)
  json_images, annotations = [], []
  for offset, (height, width, rects) in enumerate(images):
    image_id = first_id + offset
    file_name = f"{image_id:06d}.jpg"
    Image.fromarray(draw(height, width, rects)).save(os.path.join(images_dir, file_name),
                                                     quality=95)
    json_images.append({"id": image_id, "file_name": file_name, "height": height,
                        "width": width})
    for x, y, w, h, category, _ in rects:
      ann_id = len(annotations) + 1
      annotations.append({"id": ann_id, "image_id": image_id, "category_id": category,
                          "bbox": [x, y, w, h], "area": float(w * h),
                          "iscrowd": int(ann_id in crowd)})
  path = os.path.join(root, f"{name}.json")
  with open(path, "w") as f:
    json.dump({"images": json_images, "annotations": annotations, "categories": CATEGORIES}, f)
  return path, images_dir


def edit_json(path, fn):
  """Loads the JSON at path, applies fn(data) in place and writes it back."""
  with open(path) as f:
    data = json.load(f)
  fn(data)
  with open(path, "w") as f:
    json.dump(data, f)


def config(root, train=None, evaluation=None, augmentation="fixed", flip=False):
  """A small experiment config on the folder (train/eval as returned by write_split)."""
  config = ml_collections.ConfigDict()
  config.seed = 3
  config.batch_size = 2
  config.eval_batch_size = 2
  ds = config.dataset = ml_collections.ConfigDict()
  ds.name = "coco_folder"
  ds.data_dir = os.path.join(root, "tfds")
  ds.train_split = "train"
  ds.eval_split = "validation"
  ds.annotations_file, ds.images_dir = train or ("", "")
  ds.eval_annotations_file, ds.eval_images_dir = evaluation or ("", "")
  ds.augmentation = augmentation
  ds.flip = flip
  ds.scales = [64]
  ds.max_size = 96
  ds.crop_resize_scales = [48, 64]
  ds.crop_min_size = 32
  ds.crop_max_size = 64
  ds.eval_size = 64
  ds.eval_max_size = 96
  ds.buckets = [(64, 64), (64, 96), (96, 64), (96, 96)]
  ds.max_boxes = 4
  ds.shuffle_buffer = 16
  return config
