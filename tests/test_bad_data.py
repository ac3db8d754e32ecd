"""Bad annotation data gets a clear answer: a ValueError naming the record and field, or a counted
skip, never a traceback from inside TensorFlow and never a silently wrong label or box.

A property-based test (hypothesis) mutates a valid COCO instances JSON in one way per case and
runs what `coco_folder` runs when it prepares a dataset (`check_split`, then `generate_split`).
Each mutation states its expected outcome, computed here independently of the loader:
  * error: ValueError whose message names the record (`annotations[3]`) and the field ('bbox');
  * counted: the report's counter for it goes up by one, every other image is unchanged;
  * same: the examples equal the unmutated ones (after the stated change, e.g. shifted labels).
The outcome counts print with `pytest tests/test_bad_data.py --hypothesis-show-statistics`.
"""

import copy
import dataclasses
import itertools
import json
import math
import os
from typing import Callable

from hypothesis import event
from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

import coco_folder_testdata as testdata
from detr_jax.data import coco_folder
from detr_jax.data import input_pipeline
from detr_jax.data import shapes

_FILE_COUNTER = itertools.count()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  root = tmp_path_factory.mktemp("coco")
  path, images_dir = testdata.write_split(str(root), "train", testdata.TRAIN_IMAGES)
  with open(path) as f:
    data = json.load(f)
  return str(root), images_dir, data, _prepare(str(root), images_dir, data)


def _prepare(root, images_dir, data, training=False):
  """What coco_folder does with a JSON: (examples by image id, report); raises ValueError."""
  path = os.path.join(root, f"case_{next(_FILE_COUNTER)}.json")
  with open(path, "w") as f:
    json.dump(data, f)  # NaN and Infinity are written as JSON extensions, as some tools do
  try:
    categories = coco_folder.read_categories(path)
    images, per_image = coco_folder.check_split(path, images_dir, categories)
    report = {}
    examples = {key: ex for key, ex in coco_folder.generate_split(
        path, images_dir, images, per_image, training, report)}
    return examples, report
  finally:
    os.remove(path)


@dataclasses.dataclass
class Expect:
  kind: str  # "error", "counted" or "same"
  record: str = ""  # error: text naming the record, e.g. "annotations[3]"
  field: str = ""  # error: the field, e.g. "bbox"
  counters: tuple = ()  # counted: the report keys that go up by one
  # same / counted: fn(base_examples) -> expected examples, default the base ones
  expected: Callable | None = None


# ----------------------------------------------------------------------------- mutations

_NOT_INT = st.one_of(st.text(max_size=4), st.none(), st.booleans(), st.floats(),
                     st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                          st.integers(),
                                                                          max_size=1))
_NOT_NUMBER = st.one_of(st.text(max_size=4), st.none(), st.booleans(),
                        st.sampled_from([math.nan, math.inf, -math.inf]))
_REQUIRED = {"images": ("id", "file_name"), "annotations": ("id", "image_id", "category_id",
                                                            "bbox"), "categories": ("id",)}
_OPTIONAL = {"images": ("width", "height"), "annotations": ("iscrowd", "area"),
             "categories": ("name",)}
# A bad value for each checked field.
_BAD_VALUE = {
    ("images", "id"): _NOT_INT,
    ("images", "file_name"): st.one_of(st.just(""), st.integers(), st.none(), st.lists(st.text())),
    ("images", "width"): st.one_of(_NOT_INT, st.integers(max_value=0)),
    ("images", "height"): st.one_of(_NOT_INT, st.integers(max_value=0)),
    ("annotations", "id"): _NOT_INT,
    ("annotations", "image_id"): _NOT_INT,
    ("annotations", "category_id"): _NOT_INT,
    ("annotations", "bbox"): st.one_of(
        st.lists(st.floats(0, 10), max_size=3), st.lists(st.floats(0, 10), min_size=5,
                                                         max_size=6),
        st.tuples(st.integers(0, 3), _NOT_NUMBER).map(  # one value not a finite number
            lambda t: [1, 2, 3, 4][:t[0]] + [t[1]] + [1, 2, 3, 4][t[0] + 1:]),
        st.text(max_size=3), st.none(), st.dictionaries(st.text(max_size=1), st.integers(),
                                                        max_size=1)),
    ("annotations", "iscrowd"): st.one_of(st.integers().filter(lambda v: v not in (0, 1)),
                                          st.text(max_size=2), st.floats(), st.none()),
    ("annotations", "area"): st.one_of(_NOT_NUMBER, st.floats(max_value=-1e-3)),
    ("categories", "id"): st.one_of(_NOT_INT, st.integers(max_value=-1)),
}


def _missing_key(draw, data):
  kind = draw(st.sampled_from(sorted(_REQUIRED)))
  index = draw(st.integers(0, len(data[kind]) - 1))
  key = draw(st.sampled_from(_REQUIRED[kind] + _OPTIONAL[kind]))
  del data[kind][index][key]
  if key in _REQUIRED[kind]:
    return Expect("error", f"{kind}[{index}]", key)
  return Expect("same")  # sizes come from the file, iscrowd 0, area w * h, name the id


def _wrong_type(draw, data):
  kind, key = draw(st.sampled_from(sorted(_BAD_VALUE)))
  index = draw(st.integers(0, len(data[kind]) - 1))
  data[kind][index][key] = draw(_BAD_VALUE[kind, key])
  return Expect("error", f"{kind}[{index}]", key)


def _duplicate_id(draw, data):
  kind = draw(st.sampled_from(sorted(_REQUIRED)))
  i, j = draw(st.lists(st.integers(0, len(data[kind]) - 1), min_size=2, max_size=2,
                       unique=True).map(sorted))
  data[kind][j]["id"] = data[kind][i]["id"]
  return Expect("error", f"{kind}[{j}] and {kind}[{i}]", "id")


def _category_offset(draw, data):
  """0-based, 1-based or any other first id: labels are the ids themselves."""
  offset = draw(st.integers(-min(c["id"] for c in data["categories"]), 50))
  for record in data["categories"]:
    record["id"] += offset
  for record in data["annotations"]:
    record["category_id"] += offset

  def expected(examples):
    out = copy.deepcopy(examples)
    for example in out.values():
      example["objects"]["label"] = example["objects"]["label"] + offset
    return out
  return Expect("same", expected=expected)


def _many_objects(draw, data):
  """More objects than any num_queries: all kept (the input pipeline drops and counts extras)."""
  source = draw(st.sampled_from(data["annotations"]))
  copies = draw(st.integers(1, 150))
  next_id = max(a["id"] for a in data["annotations"]) + 1
  for n in range(copies):
    data["annotations"].append(dict(source, id=next_id + n))
  image_id = source["image_id"]
  x, y, w, h = source["bbox"]

  def expected(examples):
    out = copy.deepcopy(examples)
    objects = out[image_id]["objects"]
    objects["bbox"] = np.concatenate([objects["bbox"], [[x, y, x + w, y + h]] * copies])
    objects["label"] = np.concatenate([objects["label"], [source["category_id"]] * copies])
    objects["is_crowd"] = np.concatenate([objects["is_crowd"], [False] * copies])
    objects["area"] = np.concatenate([objects["area"], [source["area"]] * copies])
    return out
  return Expect("same", expected=expected)


def _box_value(draw, data):
  """One bbox value negative, huge, NaN or infinite."""
  index = draw(st.integers(0, len(data["annotations"]) - 1))
  ann = data["annotations"][index]
  k = draw(st.integers(0, 3))
  value = draw(st.one_of(st.floats(-1e6, -1e-3), st.floats(1e3, 1e30),
                         st.sampled_from([math.nan, math.inf, -math.inf, 0.0])))
  ann["bbox"][k] = value
  if not math.isfinite(value):
    return Expect("error", f"annotations[{index}]", "bbox")
  image = next(i for i in data["images"] if i["id"] == ann["image_id"])
  width, height = image["width"], image["height"]
  # Objects keep the JSON's order within an image.
  same_image = [a for a in data["annotations"] if a["image_id"] == ann["image_id"]]
  position = same_image.index(ann)
  x, y, w, h = ann["bbox"]
  x0, x1 = np.clip([x, x + w], 0, width)
  y0, y1 = np.clip([y, y + h], 0, height)
  if w < 0 or h < 0 or not (x1 > x0 and y1 > y0):
    counters = ("negative_size_boxes",) if w < 0 or h < 0 else ("empty_boxes",)
    if len(same_image) == 1:
      counters += ("images_without_training_box",)
    return Expect("counted", counters=counters,
                  expected=lambda ex: _without_box(ex, ann["image_id"], position))
  box = [x0, y0, x1, y1]
  unchanged = (x0, y0, x1, y1) == (x, y, x + w, y + h)
  return Expect("same" if unchanged else "counted",
                counters=() if unchanged else ("clipped_boxes",),
                expected=lambda ex: _with_box(ex, ann["image_id"], position, box))


def _without_box(examples, image_id, position):
  out = copy.deepcopy(examples)
  objects = out[image_id]["objects"]
  keep = np.arange(len(objects["label"])) != position
  for key in objects:
    objects[key] = objects[key][keep]
  return out


def _with_box(examples, image_id, position, box):
  out = copy.deepcopy(examples)
  out[image_id]["objects"]["bbox"][position] = box
  return out


def _empty_categories(draw, data):
  del draw
  data["categories"] = []
  data["annotations"] = []
  return Expect("error", "categories", "categories")


def _image_size(draw, data):
  index = draw(st.integers(0, len(data["images"]) - 1))
  image = data["images"][index]
  key = draw(st.sampled_from(["width", "height", "both"]))
  if draw(st.booleans()):  # no size: the file's is used
    for k in (["width", "height"] if key == "both" else [key]):
      del image[k]
    return Expect("same")
  for k in (["width", "height"] if key == "both" else [key]):
    image[k] += draw(st.integers(1, 100))
  return Expect("error", f"image id {image['id']}", "width" if key != "height" else "height")


def _dangling(draw, data):
  index = draw(st.integers(0, len(data["annotations"]) - 1))
  key = draw(st.sampled_from(["image_id", "category_id"]))
  taken = {r["id"] for r in data["images" if key == "image_id" else "categories"]}
  data["annotations"][index][key] = draw(st.integers(0, 10**6).filter(lambda v: v not in taken))
  return Expect("error", f"annotation id {data['annotations'][index]['id']}", key)


def _not_an_object(draw, data):
  kind = draw(st.sampled_from(sorted(_REQUIRED)))
  index = draw(st.integers(0, len(data[kind]) - 1))
  data[kind][index] = draw(st.one_of(st.integers(), st.text(max_size=3), st.none(),
                                     st.lists(st.integers(), max_size=2)))
  return Expect("error", f"{kind}[{index}]", "object")


def _not_a_list(draw, data):
  kind = draw(st.sampled_from(sorted(_REQUIRED)))
  data[kind] = draw(st.one_of(st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
                              st.integers(), st.text(max_size=3), st.none()))
  return Expect("error", repr(kind), "list")


MUTATIONS = {f.__name__[1:]: f for f in (
    _missing_key, _wrong_type, _duplicate_id, _category_offset, _many_objects, _box_value,
    _empty_categories, _image_size, _dangling, _not_an_object, _not_a_list)}


def _assert_examples_equal(actual, expected):
  assert sorted(actual) == sorted(expected)
  for key, example in expected.items():
    got = actual[key]
    assert got["image_id"] == example["image_id"]
    for field in ("bbox", "label", "is_crowd", "area"):
      np.testing.assert_allclose(np.asarray(got["objects"][field], np.float64),
                                 np.asarray(example["objects"][field], np.float64),
                                 rtol=1e-6, err_msg=f"image {key} {field}")


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(MUTATIONS)), draw=st.data())
def test_mutated_coco_json_gives_a_clear_answer(base, name, draw):
  root, images_dir, base_data, (base_examples, base_report) = base
  data = copy.deepcopy(base_data)
  expect = MUTATIONS[name](draw.draw, data)
  event(f"{name}: {expect.kind}" + (f" ({', '.join(expect.counters)})" if expect.counters
                                    else ""))
  if expect.kind == "error":
    with pytest.raises(ValueError) as error:
      _prepare(root, images_dir, data)
    message = str(error.value)
    assert expect.record in message, (expect, message)
    assert expect.field in message, (expect, message)
    return
  examples, report = _prepare(root, images_dir, data)
  wanted = expect.expected(base_examples) if expect.expected else base_examples
  _assert_examples_equal(examples, wanted)
  for counter, value in base_report.items():
    if counter == "examples":
      continue
    assert report[counter] == value + (counter in expect.counters), (counter, report, expect)


def test_the_unmutated_json_loads_every_box(base):
  _, _, data, (examples, report) = base
  assert report["examples"] == len(data["images"])
  assert sum(len(e["objects"]["label"]) for e in examples.values()) == len(data["annotations"])
  assert all(v == 0 for k, v in report.items() if k not in ("examples", "images"))


@pytest.mark.parametrize("damage, message", [
    (lambda d: d["annotations"][2]["bbox"].__setitem__(1, math.nan),
     r"annotations\[2\] \(id 3\): field 'bbox'"),
    (lambda d: d["images"][1].update(id="2"), r"images\[1\] \(id '2'\): field 'id'"),
    (lambda d: d["images"][0].update(width=65), r"image id 1 .*'width'"),
])
def test_bad_json_fails_through_the_dataset_builder(tmp_path, damage, message):
  """The same answers through TFDS preparation: our ValueError, not one from inside TensorFlow."""
  train = testdata.write_split(str(tmp_path), "train", testdata.TRAIN_IMAGES)
  testdata.edit_json(train[0], damage)
  with pytest.raises(ValueError, match=message):
    input_pipeline.dataset_info(testdata.config(str(tmp_path), train).dataset)


@pytest.mark.parametrize("kwargs, field", [
    (dict(image_size=16), "image_size"), (dict(max_objects=0), "max_objects"),
    (dict(num_train_examples=0), "num_train_examples"),
    (dict(num_eval_examples=-3), "num_eval_examples"),
])
def test_shapes_settings_are_checked(kwargs, field):
  with pytest.raises(ValueError, match=field):
    shapes.make_config(**kwargs)
