"""Synthetic detection dataset: coloured shapes on textured, noisy backgrounds (TFDS builder).

Six classes, label id = index (0..5, so `num_classes` = 6; unlike COCO, id 0 is used):

    0 circle (red)   1 square (green)   2 triangle (blue)   3 ellipse (yellow)
    4 star (purple)  5 ring (cyan)

Each class has its own hue, jittered per object, so a small DETR learns the task on a CPU in
minutes; what it has to learn is where the objects are and how big: 1..max_objects objects per
image, box sides 18%..45% of the image side, overlap limited (IoU <= 0.25, and an object never
hides more than 35% of an earlier one's box), on a background of a low-saturation gradient,
stripes and Gaussian noise. Boxes are the tight pixel extents of each drawn shape (xyxy, pixels).

Generation is deterministic: example i of a split is a function of (seed, split, i) only
(`numpy.random.default_rng`). The builder config name encodes image size, example counts,
max_objects and seed, so differently sized datasets live side by side in one data_dir:
`<data_dir>/detr_shapes/s128_tr2000_ev200_obj6_seed0/1.0.0`. TFDS prepares it on first use
(no download).
"""

import dataclasses

from etils import epath
import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from detr_jax.data import features

CLASS_NAMES = ("circle", "square", "triangle", "ellipse", "star", "ring")
CLASS_COLOURS = ((220, 40, 40), (40, 200, 60), (40, 70, 230), (230, 210, 40), (210, 50, 210),
                 (40, 210, 220))
_MIN_SIDE = 0.18  # fraction of the image side
_MAX_SIDE = 0.45
_MAX_IOU = 0.25
_MAX_HIDDEN = 0.35


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """Size and seed of a shapes dataset."""
  image_size: int = 128
  num_train_examples: int = 2000
  num_eval_examples: int = 200
  max_objects: int = 6
  seed: int = 0


def make_config(image_size=128, num_train_examples=2000, num_eval_examples=200, max_objects=6,
                seed=0) -> ShapesConfig:
  """Builder config whose name encodes every generation parameter."""
  if image_size < 32:
    raise ValueError(f"config.dataset.image_size={image_size}: use at least 32 pixels.")
  if max_objects < 1:
    raise ValueError(f"config.dataset.max_objects={max_objects}: use at least 1.")
  if num_train_examples < 1 or num_eval_examples < 1:
    raise ValueError("config.dataset.num_train_examples and num_eval_examples must be >= 1 "
                     f"(got {num_train_examples}, {num_eval_examples}).")
  name = (f"s{image_size}_tr{num_train_examples}_ev{num_eval_examples}_obj{max_objects}"
          f"_seed{seed}")
  return ShapesConfig(name=name, image_size=image_size, num_train_examples=num_train_examples,
                      num_eval_examples=num_eval_examples, max_objects=max_objects, seed=seed)


def _background(rng, size):
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  angle = rng.uniform(0, 2 * np.pi)
  base = rng.uniform(70, 170)
  gradient = base + rng.uniform(20, 60) * (np.cos(angle) * xx + np.sin(angle) * yy - 0.5)
  period = rng.uniform(6, 20)
  stripes = rng.uniform(5, 15) * np.sin(2 * np.pi * (xx * np.sin(angle) - yy * np.cos(angle))
                                        * size / period)
  grey = gradient + stripes
  tint = rng.uniform(-12, 12, size=3)  # low saturation: never mistaken for a class colour
  image = grey[..., None] + tint + rng.normal(0, 10, size=(size, size, 3))
  return image


def _star(cx, cy, rx, ry, rotation, points=5, inner=0.45):
  angles = rotation + np.arange(2 * points) * np.pi / points
  radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
  return list(zip(cx + rx * radius * np.sin(angles), cy - ry * radius * np.cos(angles)))


def _draw_shape(draw, label, x0, y0, x1, y1, rng, fill):
  w, h = x1 - x0, y1 - y0
  if label == 0 or label == 3:  # circle, ellipse: the box is already square / elongated
    draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
  elif label == 1:
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
  elif label == 2:
    if rng.uniform() < 0.5:
      points = [(x0 + w / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)]
    else:
      points = [(x0, y0), (x1 - 1, y0), (x0 + w / 2, y1 - 1)]
    draw.polygon(points, fill=fill)
  elif label == 4:
    draw.polygon(_star(x0 + w / 2, y0 + h / 2, w / 2, h / 2, rng.uniform(0, 2 * np.pi)), fill=fill)
  else:  # ring
    draw.ellipse([x0, y0, x1 - 1, y1 - 1], outline=fill, width=max(2, int(0.22 * min(w, h))))


def _box_overlaps(box, others):
  """(max IoU with others, max fraction of another box covered by box)."""
  if not others:
    return 0.0, 0.0
  others = np.asarray(others, np.float64)
  ix = np.maximum(0, np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]))
  iy = np.maximum(0, np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]))
  inter = ix * iy
  area = (box[2] - box[0]) * (box[3] - box[1])
  other_area = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
  return float(np.max(inter / (area + other_area - inter))), float(np.max(inter / other_area))


def generate_example(seed: int, split_code: int, index: int, image_size: int, max_objects: int):
  """Draws one image.

  Args:
    seed: dataset seed.
    split_code: 0 for train, 1 for eval (different images).
    index: example index in the split.
    image_size: side of the square image.
    max_objects: at most this many objects (at least 1).

  Returns:
    (image uint8 [S, S, 3], boxes float32 [n, 4] xyxy pixels, labels int64 [n],
    areas float32 [n] drawn pixel counts).
  """
  rng = np.random.default_rng([seed, split_code, index])
  size = image_size
  canvas = _background(rng, size)
  num_objects = int(rng.integers(1, max_objects + 1))
  placed = []  # (x0, y0, x1, y1, label) in integer pixels
  for _ in range(num_objects):
    for _ in range(50):
      label = int(rng.integers(0, len(CLASS_NAMES)))
      side = rng.uniform(_MIN_SIDE, _MAX_SIDE) * size
      aspect = 1.0
      if label == 3:
        aspect = rng.choice([rng.uniform(0.45, 0.65), rng.uniform(1.55, 2.2)])
      elif label in (2, 4):
        aspect = rng.uniform(0.8, 1.25)
      w = int(round(min(size, side * np.sqrt(aspect))))
      h = int(round(min(size, side / np.sqrt(aspect))))
      w = max(w, int(np.ceil(0.12 * size)))
      h = max(h, int(np.ceil(0.12 * size)))
      x0 = int(rng.integers(0, size - w + 1))
      y0 = int(rng.integers(0, size - h + 1))
      box = (x0, y0, x0 + w, y0 + h)
      iou, hidden = _box_overlaps(box, [p[:4] for p in placed])
      if iou <= _MAX_IOU and hidden <= _MAX_HIDDEN:
        placed.append(box + (label,))
        break
  image, boxes, areas = draw_objects(canvas, placed, rng, [seed, split_code, index])
  return (image, np.asarray(boxes, np.float32).reshape(-1, 4),
          np.asarray([p[4] for p in placed], np.int64), np.asarray(areas, np.float32))


def draw_objects(canvas, placed, rng, key):
  """Draws the placed shapes on a background; returns (image, drawn xyxy boxes, pixel counts).

  Args:
    canvas: float [h, w, 3] background (`_background`).
    placed: [(x0, y0, x1, y1, label)] integer pixel boxes, label an index of CLASS_NAMES.
    rng: the image's generator (draws each shape's colour jitter).
    key: the image's seed sequence; with (x0, y0) it seeds each shape's own drawing choices.

  Returns:
    (uint8 [h, w, 3] image, [[x0, y0, x1, y1]] tight boxes of the drawn pixels, [pixel count]).
  """
  image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
  boxes, areas = [], []
  for x0, y0, x1, y1, label in placed:
    fill = tuple(int(c) for c in np.clip(np.array(CLASS_COLOURS[label])
                                         + rng.integers(-25, 26, size=3), 0, 255))
    mask = Image.new("L", image.size, 0)
    _draw_shape(ImageDraw.Draw(mask), label, x0, y0, x1, y1,
                np.random.default_rng([*key, x0, y0]), 255)
    _draw_shape(ImageDraw.Draw(image), label, x0, y0, x1, y1,
                np.random.default_rng([*key, x0, y0]), fill)
    ys, xs = np.nonzero(np.asarray(mask))
    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    areas.append(len(xs))
  return np.asarray(image), boxes, areas


class DetrShapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes on textured backgrounds, for tests and CPU demos."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Six shape classes, ids 0..5."}
  BUILDER_CONFIGS = [make_config()]

  # TFDS looks for a checksums file next to the builder's code through importlib_resources,
  # which is not always installed; nothing is downloaded here, so point it at this file.
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Synthetic coloured shapes for DETR tests.",
        features=features.detection_features(),
        metadata=tfds.core.MetadataDict(class_names=list(CLASS_NAMES)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {
        "train": self._generate_examples(0, cfg.num_train_examples),
        "validation": self._generate_examples(1, cfg.num_eval_examples),
    }

  def _generate_examples(self, split_code, num_examples):
    cfg = self.builder_config
    for index in range(num_examples):
      image, boxes, labels, areas = generate_example(
          cfg.seed, split_code, index, cfg.image_size, cfg.max_objects)
      yield index, {
          "image": image,
          "image_id": index + 1,
          "objects": {"bbox": boxes, "label": labels, "is_crowd": np.zeros(len(labels), bool),
                      "area": areas},
      }


def builder(ds_config) -> DetrShapes:
  """The shapes builder for config.dataset (prepared on first use)."""
  shapes_config = make_config(
      image_size=int(ds_config.get("image_size", 128)),
      num_train_examples=int(ds_config.get("num_train_examples", 2000)),
      num_eval_examples=int(ds_config.get("num_eval_examples", 200)),
      max_objects=int(ds_config.get("max_objects", 6)),
      seed=int(ds_config.get("shapes_seed", 0)))
  if shapes_config.name in DetrShapes.builder_configs:  # TFDS refuses a copy of a listed one
    shapes_config = shapes_config.name
  shapes_builder = DetrShapes(config=shapes_config, data_dir=ds_config.get("data_dir"))
  shapes_builder.download_and_prepare()
  return shapes_builder
