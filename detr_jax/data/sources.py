"""Data sources by config.dataset.name: a prepared TFDS builder and how to read its records.

| name        | builder                                   | labels                          |
|-------------|-------------------------------------------|---------------------------------|
| coco        | TFDS `coco/2017` (`detr_jax.data.coco`)    | COCO category ids 1..90 (91-id) |
| coco_folder | `detr_jax.data.coco_folder` (user JSON)    | the JSON's category ids          |
| shapes      | `detr_jax.data.shapes` (synthetic)         | shape type 0..5                  |
"""

import dataclasses
from typing import Any, Callable, Mapping

import tensorflow_datasets as tfds

from detr_jax.data import features


@dataclasses.dataclass(frozen=True)
class Source:
  """A prepared dataset and the functions that read its records.

  Attributes:
    builder: prepared TFDS builder.
    train_split: TFDS split name for training.
    eval_split: TFDS split name for evaluation.
    decoders: TFDS decoders for `as_dataset` (images stay encoded until after shuffle/skip).
    decode: raw record -> common example (see `detr_jax.data.transforms`).
    has_training_boxes: raw record -> bool, False when training would drop the image.
    all_train_usable: True when every train record has a training box (no counting pass needed).
    num_classes: max label id + 1.
    class_names: label id -> name.
  """
  builder: tfds.core.DatasetBuilder
  train_split: str
  eval_split: str
  decoders: Mapping[str, Any]
  decode: Callable[[Any], Any]
  has_training_boxes: Callable[[Any], Any]
  all_train_usable: bool
  num_classes: int
  class_names: Mapping[int, str]


def get_source(ds_config) -> Source:
  """Builds (preparing on first use) the source named by config.dataset.name.

  Args:
    ds_config: config.dataset.

  Returns:
    The Source.

  Raises:
    ValueError: unknown name, or a dataset that cannot be prepared (see each builder).
  """
  name = ds_config.get("name", "coco")
  train_split = ds_config.get("train_split", "train")
  eval_split = ds_config.get("eval_split", "validation")
  skip_image = {"image": tfds.decode.SkipDecoding()}
  if name == "shapes":
    from detr_jax.data import shapes  # pylint: disable=g-import-not-at-top
    builder = shapes.builder(ds_config)
    names = dict(enumerate(shapes.CLASS_NAMES))
    return Source(builder, train_split, eval_split, skip_image, features.decode_example,
                  features.has_training_boxes, True, len(names), names)
  if name == "coco_folder":
    from detr_jax.data import coco_folder  # pylint: disable=g-import-not-at-top
    builder = coco_folder.builder(ds_config)
    names = coco_folder.class_names(builder)
    # The builder keeps only images with a training box in its train split.
    return Source(builder, train_split, eval_split, skip_image, features.decode_example,
                  features.has_training_boxes, True, max(names) + 1, names)
  if name == "coco":
    from detr_jax.data import coco  # pylint: disable=g-import-not-at-top
    builder = coco.builder(ds_config)
    return Source(builder, train_split, eval_split, skip_image, coco.decode_example,
                  coco.has_training_boxes, False, coco.NUM_CLASSES, coco.class_names())
  raise ValueError(f"config.dataset.name={name!r} is not a dataset: use 'coco', 'coco_folder' "
                   "or 'shapes'.")
