"""TFDS builder for a user's COCO-format folder: an instances JSON and a folder of images.

config.dataset fields: annotations_file + images_dir (train split "train"), and
eval_annotations_file + eval_images_dir (split "validation"; optional). The builder config name
is derived from the absolute paths and the JSONs' size and modification time, so two folders (or
an edited JSON) never share a prepared dataset: `<data_dir>/detr_coco_folder/<name>/1.0.0`.

Labels are the JSON's category ids (so `num_classes` = max id + 1, like COCO's 91); class names
come from its "categories". Each example keeps image_id, iscrowd and area.

The JSON is checked when the dataset is prepared, i.e. before training starts:

| problem                                   | behaviour                                          |
|-------------------------------------------|----------------------------------------------------|
| missing key, wrong type (a string id, a   | ValueError naming the record (`annotations[3]     |
|   bbox of 3 values, a non-integer id),     |   (id 17)`) and the field                          |
|   NaN or infinite box value, duplicate     |                                                    |
|   image / annotation / category id         |                                                    |
| annotation with an unknown category id    | ValueError naming the annotation id                |
| annotation of an unknown image id          | ValueError naming the annotation id                |
| missing image file                        | ValueError naming the file                         |
| image whose JSON width/height are not     | ValueError naming the image id (its boxes would be |
|   the file's                               |   in another image's pixels)                       |
| image without width/height                | the file's size is used                            |
| corrupt (undecodable) image file           | image skipped, counted, warning logged             |
| box partly outside the image (or huge)     | clipped to the image, counted in a log line        |
| box with negative width or height          | annotation dropped, counted in a log line          |
| box with no area inside the image          | annotation dropped, counted in a log line          |
| image without annotations (or only crowd   | kept in "validation"; left out of "train" (as the |
|   boxes)                                   |   official loader), counted in a log line          |
| more boxes than config.dataset.max_boxes   | kept here; the input pipeline drops the extra ones |
|                                            |   and logs how many                                |
| empty split (no usable image), no          | ValueError                                         |
|   categories                               |                                                    |

Category ids may start at 0 or 1 (or anywhere): labels are the ids themselves.

The counts are logged and stored in the dataset's metadata ("report").
"""

import dataclasses
import hashlib
import json
import os

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from detr_jax.data import features


@dataclasses.dataclass
class CocoFolderConfig(tfds.core.BuilderConfig):
  """Paths of one COCO-format dataset."""
  annotations_file: str = ""
  images_dir: str = ""
  eval_annotations_file: str = ""
  eval_images_dir: str = ""


def _file_key(path):
  if not path:
    return ""
  stat = os.stat(path)
  return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def make_config(annotations_file, images_dir, eval_annotations_file="",
                eval_images_dir="") -> CocoFolderConfig:
  """Builder config for the given paths (name = readable stem + hash of paths and JSON stamps)."""
  for what, path in (("annotations_file", annotations_file), ("images_dir", images_dir)):
    if not path:
      raise ValueError(f"config.dataset.{what} is empty: coco_folder needs the train instances "
                       "JSON (annotations_file) and its images folder (images_dir).")
  for what, path in (("annotations_file", annotations_file),
                     ("eval_annotations_file", eval_annotations_file)):
    if path and not os.path.isfile(path):
      raise ValueError(f"config.dataset.{what}={path!r} is not a file.")
  for what, path in (("images_dir", images_dir), ("eval_images_dir", eval_images_dir)):
    if path and not os.path.isdir(path):
      raise ValueError(f"config.dataset.{what}={path!r} is not a directory.")
  if bool(eval_annotations_file) != bool(eval_images_dir):
    raise ValueError("Give both config.dataset.eval_annotations_file and eval_images_dir, or "
                     "neither.")
  key = "|".join([_file_key(annotations_file), os.path.abspath(images_dir),
                  _file_key(eval_annotations_file),
                  os.path.abspath(eval_images_dir) if eval_images_dir else ""])
  stem = "".join(c if c.isalnum() else "_" for c in
                 os.path.splitext(os.path.basename(annotations_file))[0])[:40]
  name = f"{stem}_{hashlib.sha1(key.encode()).hexdigest()[:12]}"
  return CocoFolderConfig(name=name, annotations_file=annotations_file, images_dir=images_dir,
                          eval_annotations_file=eval_annotations_file,
                          eval_images_dir=eval_images_dir)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _record(kind, index, record) -> str:
  rid = record.get("id") if isinstance(record, dict) else None
  return f"{kind}[{index}]" + (f" (id {rid!r})" if rid is not None else "")


def _check_records(path, data):
  """Raises ValueError naming the record and field of the first malformed entry of data."""
  # key: (required, check, what it must be)
  schema = {
      "categories": {"id": (True, lambda v: _is_int(v) and v >= 0, "a non-negative integer")},
      "images": {
          "id": (True, _is_int, "an integer"),
          "file_name": (True, lambda v: isinstance(v, str) and v, "a non-empty string"),
          "width": (False, lambda v: _is_int(v) and v > 0, "a positive integer"),
          "height": (False, lambda v: _is_int(v) and v > 0, "a positive integer"),
      },
      "annotations": {
          "id": (True, _is_int, "an integer"),
          "image_id": (True, _is_int, "an integer"),
          "category_id": (True, _is_int, "an integer"),
          "bbox": (True, lambda v: isinstance(v, list) and len(v) == 4 and all(
              _is_number(x) and np.isfinite(x) for x in v), "[x, y, width, height]: 4 finite "
                   "numbers"),
          "iscrowd": (False, lambda v: v in (0, 1) and not isinstance(v, float), "0 or 1"),
          "area": (False, lambda v: _is_number(v) and np.isfinite(v) and v >= 0,
                   "a finite non-negative number"),
      },
  }
  for kind, fields in schema.items():
    records = data[kind]
    if not isinstance(records, list):
      raise ValueError(f"{path}: {kind!r} is a {type(records).__name__}, not a list.")
    seen = {}
    for index, record in enumerate(records):
      if not isinstance(record, dict):
        raise ValueError(f"{path}: {kind}[{index}] is a {type(record).__name__}, not an object.")
      for key, (required, ok, what) in fields.items():
        if key not in record:
          if required:
            raise ValueError(f"{path}: {_record(kind, index, record)} has no field {key!r}.")
          continue
        if not ok(record[key]):
          raise ValueError(f"{path}: {_record(kind, index, record)}: field {key!r} is "
                           f"{record[key]!r}; it must be {what}.")
      rid = record["id"]
      if rid in seen:
        raise ValueError(f"{path}: {kind}[{index}] and {kind}[{seen[rid]}] have the same "
                         f"field 'id' {rid!r}; ids must be unique.")
      seen[rid] = index


def _load_json(path):
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path} holds a {type(data).__name__}, not a COCO instances object.")
  for key in ("images", "annotations", "categories"):
    if key not in data:
      raise ValueError(f"{path} has no {key!r} list: it is not a COCO instances file.")
  _check_records(path, data)
  return data


def read_categories(path) -> dict:
  """{category id: name} of a COCO instances JSON (ids must be non-negative integers)."""
  categories = {}
  for category in _load_json(path)["categories"]:
    cat_id = category["id"]
    categories[cat_id] = str(category.get("name", cat_id))
  if not categories:
    raise ValueError(f"{path} has no categories.")
  return categories


def check_split(annotations_file, images_dir, categories):
  """Checks a COCO JSON's ids and image files (the errors of the module docstring's table).

  Args:
    annotations_file: instances JSON.
    images_dir: folder of its images.
    categories: valid category ids (those of the train JSON).

  Returns:
    (images: {image id: JSON image entry}, annotations: {image id: list of JSON annotations}).

  Raises:
    ValueError: unknown category or image id, missing image file, no images.
  """
  data = _load_json(annotations_file)
  images = {image["id"]: image for image in data["images"]}
  if not images:
    raise ValueError(f"{annotations_file} lists no images: the split would be empty.")
  per_image = {image_id: [] for image_id in images}
  for ann in data["annotations"]:
    if ann.get("category_id") not in categories:
      raise ValueError(f"{annotations_file}: annotation id {ann.get('id')} has category_id "
                       f"{ann.get('category_id')!r}, which is not in the train categories "
                       f"{sorted(categories)}. Fix the annotation or add the category.")
    if ann.get("image_id") not in images:
      raise ValueError(f"{annotations_file}: annotation id {ann.get('id')} refers to image_id "
                       f"{ann.get('image_id')!r}, which is not in 'images'.")
    per_image[ann["image_id"]].append(ann)
  for image in images.values():
    path = os.path.join(images_dir, image["file_name"])
    if not os.path.isfile(path):
      raise ValueError(f"Image file {path} (image id {image['id']}) of {annotations_file} does "
                       "not exist: fix images_dir or the JSON's file_name.")
  return images, per_image


def _read_image(path):
  """What the Image feature stores: the file itself when it is an RGB JPEG/PNG, else pixels."""
  with Image.open(path) as pil_image:
    pil_image.load()  # raises on truncated or corrupt data
    if pil_image.format in ("JPEG", "PNG") and pil_image.mode == "RGB":
      return path, pil_image.size[::-1]
    pixels = np.asarray(pil_image.convert("RGB"))
  return pixels, pixels.shape[:2]


def generate_split(annotations_file, images_dir, images, per_image, training, report):
  """Yields (key, example) of one split, applying the module docstring's rules; fills report."""
  report.update(images=len(images), examples=0, corrupt_images=0, clipped_boxes=0,
                negative_size_boxes=0, empty_boxes=0, images_without_training_box=0)
  for image_id in sorted(images):
    path = os.path.join(images_dir, images[image_id]["file_name"])
    try:
      image, (height, width) = _read_image(path)
    except (OSError, SyntaxError, ValueError) as e:
      report["corrupt_images"] += 1
      logging.warning("Skipping corrupt image %s (image id %s): %s", path, image_id, e)
      continue
    stated = (images[image_id].get("height", height), images[image_id].get("width", width))
    if stated != (height, width):
      raise ValueError(
          f"{annotations_file}: image id {image_id} says height x width = {stated[0]} x "
          f"{stated[1]} (fields 'height', 'width') but {path} is {height} x {width}: its boxes "
          "would be in another image's pixels. Fix the JSON or use the original images.")
    boxes, labels, crowd, areas = [], [], [], []
    for ann in per_image[image_id]:
      x, y, w, h = (float(v) for v in ann["bbox"])
      if w < 0 or h < 0:
        report["negative_size_boxes"] += 1
        continue
      x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
      x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
      if not (x1 > x0 and y1 > y0):
        report["empty_boxes"] += 1
        continue
      if (x0, y0, x1, y1) != (x, y, x + w, y + h):
        report["clipped_boxes"] += 1
      boxes.append([x0, y0, x1, y1])
      labels.append(ann["category_id"])
      crowd.append(bool(ann.get("iscrowd", 0)))
      areas.append(float(ann.get("area", w * h)))
    if all(crowd):
      report["images_without_training_box"] += 1
      if training:
        continue
    report["examples"] += 1
    yield image_id, {
        "image": image,
        "image_id": image_id,
        "objects": {"bbox": np.asarray(boxes, np.float32).reshape(-1, 4),
                    "label": np.asarray(labels, np.int64),
                    "is_crowd": np.asarray(crowd, bool),
                    "area": np.asarray(areas, np.float32)},
    }
  logging.info("%s: %s", annotations_file, report)
  if not report["examples"]:
    raise ValueError(f"{annotations_file} gives an empty split ({report}): "
                     + ("training needs images with at least one non-crowd box of positive size."
                        if training else "it holds no readable image."))


class DetrCocoFolder(tfds.core.GeneratorBasedBuilder):
  """A COCO-format folder (instances JSON + images) as a TFDS dataset."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Boxes xyxy pixels, label = category id."}

  # TFDS looks for a checksums file next to the builder's code through importlib_resources,
  # which is not always installed; nothing is downloaded here, so point it at this file.
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    categories = read_categories(cfg.annotations_file) if cfg.annotations_file else {}
    return self.dataset_info_from_configs(
        description=f"COCO-format folder {cfg.annotations_file}.",
        features=features.detection_features(),
        metadata=tfds.core.MetadataDict(categories=sorted(categories.items())),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    cfg = self.builder_config
    categories = read_categories(cfg.annotations_file)
    # Check every split's ids and files before writing anything, so a bad eval JSON fails
    # before a long train split is written.
    splits = {"train": (cfg.annotations_file, cfg.images_dir, True)}
    if cfg.eval_annotations_file:
      splits["validation"] = (cfg.eval_annotations_file, cfg.eval_images_dir, False)
    checked = {name: check_split(ann, images_dir, categories)
               for name, (ann, images_dir, _) in splits.items()}
    reports = {name: {} for name in splits}
    self.info.metadata["report"] = reports
    return {name: self._generate_examples(ann, images_dir, *checked[name], training,
                                          reports[name])
            for name, (ann, images_dir, training) in splits.items()}

  def _generate_examples(self, annotations_file, images_dir, images, per_image, training,
                         report):
    return generate_split(annotations_file, images_dir, images, per_image, training, report)


def builder(ds_config) -> DetrCocoFolder:
  """The prepared builder of config.dataset's COCO-format folder."""
  folder_config = make_config(ds_config.get("annotations_file", ""),
                              ds_config.get("images_dir", ""),
                              ds_config.get("eval_annotations_file", ""),
                              ds_config.get("eval_images_dir", ""))
  folder_builder = DetrCocoFolder(config=folder_config, data_dir=ds_config.get("data_dir"))
  folder_builder.download_and_prepare()
  return folder_builder


def class_names(folder_builder) -> dict:
  """{category id: name} stored with the prepared dataset."""
  return {int(cat_id): name for cat_id, name in folder_builder.info.metadata["categories"]}
