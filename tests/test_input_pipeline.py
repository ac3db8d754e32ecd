"""Tests of the augmentations, batching, sharding and resume of detr_jax.data.input_pipeline."""

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from detr_jax.data import input_pipeline
from detr_jax.data import sources
from detr_jax.data import transforms

import coco_folder_testdata as testdata

MEAN = np.array(transforms.IMAGENET_MEAN) * 255
STD = np.array(transforms.IMAGENET_STD) * 255


def _denormalise(image):
  return image * STD + MEAN


def _detr_config():
  return ml_collections.ConfigDict(dict(
      augmentation="detr", flip=True, scales=[64, 80, 96], max_size=140,
      crop_resize_scales=[60, 80, 100], crop_min_size=40, crop_max_size=90,
      buckets=[(96, 140), (140, 96), (140, 140)]))


def _colour_box(image, colour):
  """xyxy pixel extent of the pixels close to colour, or None."""
  near = np.abs(image - np.array(colour)).max(-1) < 40
  if not near.any():
    return None
  ys, xs = np.nonzero(near)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_augmentation_keeps_boxes_on_their_objects():
  height, width = 90, 120
  rects = [(70, 12, 30, 40, 1, (250, 20, 250)), (8, 50, 24, 30, 3, (20, 250, 20))]
  example = {"image": tf.constant(testdata.draw(height, width, rects)),
             "boxes": tf.constant([[x, y, x + w, y + h] for x, y, w, h, _, _ in rects],
                                  tf.float32),
             "labels": tf.constant([1, 3], tf.int32)}
  ds_config = _detr_config()
  kept_and_dropped = [0, 0]
  for seed in range(40):
    flip, region, out_size = transforms.train_geometry(
        tf.constant([seed, 7], tf.int64), height, width, ds_config)
    image, boxes, labels = transforms.apply_geometry(example, flip, region, out_size)
    image = _denormalise(image.numpy())
    out_h, out_w = out_size.numpy()
    assert any(out_h <= bh and out_w <= bw for bh, bw in ds_config.buckets)
    for label, colour in ((1, (250, 20, 250)), (3, (20, 250, 20))):
      found = _colour_box(image, colour)
      matches = np.nonzero(labels.numpy() == label)[0]
      # A rectangle cut to a sliver by the crop may show no clean pixel; otherwise it has a box.
      if found is None:
        kept_and_dropped[1] += 1
        continue
      kept_and_dropped[0] += 1
      assert len(matches) == 1, (seed, label)
      cx, cy, w, h = boxes.numpy()[matches[0]] * [out_w, out_h, out_w, out_h]
      np.testing.assert_allclose([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], found,
                                 atol=2.0, err_msg=f"seed {seed}")
  assert kept_and_dropped[0] > 40 and kept_and_dropped[1] > 0  # both cases were exercised


def test_crop_drops_boxes_outside_it():
  boxes = tf.constant([[0, 0, 10, 10], [50, 50, 60, 60], [35, 0, 45, 10]], tf.float32)
  region = tf.constant([0.0, 0.0, 40.0, 40.0])  # y0, x0, y1, x1
  cxcywh, keep = transforms.boxes_to_region(boxes, region)
  np.testing.assert_array_equal(keep, [True, False, True])
  np.testing.assert_allclose(cxcywh.numpy()[2], [37.5 / 40, 5 / 40, 5 / 40, 10 / 40])
  # Random crops: a box survives exactly when it overlaps the crop with positive area.
  height, width = 100, 100
  grid = tf.constant([[x, y, x + 12, y + 12] for x in range(0, 90, 22) for y in range(0, 90, 22)],
                     tf.float32)
  ds_config = _detr_config()
  ds_config.flip = False
  example = {"image": tf.zeros([height, width, 3], tf.uint8), "boxes": grid,
             "labels": tf.range(grid.shape[0])}
  saw_drop = False
  for seed in range(20):
    _, region, out_size = transforms.train_geometry(tf.constant([seed, 1], tf.int64), height,
                                                    width, ds_config)
    _, _, labels = transforms.apply_geometry(example, tf.constant(False), region, out_size)
    y0, x0, y1, x1 = region.numpy()
    g = grid.numpy()
    overlap = (np.minimum(g[:, 2], x1) > np.maximum(g[:, 0], x0)) & (
        np.minimum(g[:, 3], y1) > np.maximum(g[:, 1], y0))
    np.testing.assert_array_equal(labels.numpy(), np.nonzero(overlap)[0])
    saw_drop |= not overlap.all()
  assert saw_drop


def _official_size(h, w, size, max_size):
  """DETR datasets/transforms.py get_size_with_aspect_ratio, returning (h, w)."""
  min_original, max_original = float(min(w, h)), float(max(w, h))
  if max_original / min_original * size > max_size:
    size = int(round(max_size * min_original / max_original))
  if (w <= h and w == size) or (h <= w and h == size):
    return h, w
  return (int(size * h / w), size) if w < h else (size, int(size * w / h))


def test_resize_matches_official_get_size():
  for h, w, size in [(480, 640, 800), (640, 427, 512), (333, 1000, 800), (600, 600, 480),
                     (375, 500, 736), (1000, 333, 608)]:
    got = [int(v) for v in transforms.resized_size(h, w, size, 1333)]
    assert tuple(got) == _official_size(h, w, size, 1333)


@pytest.fixture
def folder(tmp_path):
  train = testdata.write_split(str(tmp_path), "train", testdata.TRAIN_IMAGES)
  evaluation = testdata.write_split(str(tmp_path), "val", testdata.EVAL_IMAGES, first_id=100)
  return str(tmp_path), train, evaluation


def test_pixel_mask_and_static_shapes(folder):
  root, train, evaluation = folder
  config = testdata.config(root, train, evaluation)  # fixed: shorter side 64, longer <= 96
  sizes = set()
  for batch in input_pipeline.create_eval_iterator(config, 0, 1):
    assert batch["images"].shape[1:3] in config.dataset.buckets
    for i in np.nonzero(batch["example_valid"])[0]:
      h, w = batch["orig_size"][i]
      out_h, out_w = _official_size(int(h), int(w), 64, 96)
      expected = np.zeros(batch["pixel_mask"].shape[1:], bool)
      expected[:out_h, :out_w] = True
      np.testing.assert_array_equal(batch["pixel_mask"][i], expected)
      assert np.all(batch["images"][i][~expected] == 0)
      sizes.add(batch["images"].shape[1:3])
  config.dataset.augmentation = "detr"
  it = input_pipeline.create_train_iterator(config, 0, 0, 1)
  for _ in range(8):
    batch = next(it)
    assert batch["images"].shape[1:3] in config.dataset.buckets
    sizes.add(batch["images"].shape[1:3])
    for mask, image in zip(batch["pixel_mask"], batch["images"]):
      rows, cols = np.nonzero(mask)
      assert mask[:rows.max() + 1, :cols.max() + 1].all()  # a top-left rectangle
      assert np.all(image[~mask] == 0)
  assert len(sizes) > 1


def test_buckets_must_include_a_covering_one():
  ds = ml_collections.ConfigDict(dict(buckets=[(64, 96), (96, 64)]))
  with pytest.raises(ValueError, match=r"add \(96, 96\)"):
    input_pipeline.sorted_buckets(ds)


def _signature(batch, i):
  n = batch["valid"][i].sum()
  return tuple(np.round(batch["boxes"][i][:n], 3).ravel()) + tuple(batch["labels"][i][:n])


@pytest.mark.parametrize("cache_train,resized", [(False, False), (True, False), (True, True)])
def test_process_shards_are_disjoint_and_cover_the_split(folder, cache_train, resized):
  root, train, evaluation = folder
  config = testdata.config(root, train, evaluation)
  config.dataset.cache_train = cache_train
  config.dataset.cache_train_resized = resized
  config.batch_size = 2  # one example per process
  seen = []
  for process in (0, 1):
    it = input_pipeline.create_train_iterator(config, 0, process, 2)
    assert it.steps_per_epoch == 3
    seen.append({_signature(b, 0) for b in (next(it) for _ in range(3))})
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == len(testdata.TRAIN_IMAGES)

  config.eval_batch_size = 4  # 2 per process: shards of 3 and 2 -> 2 batches each
  ids, num_batches = [], []
  for process in (0, 1):
    batches = list(input_pipeline.create_eval_iterator(config, process, 2))
    num_batches.append(len(batches))
    for b in batches:
      assert b["images"].shape[0] == 2
      ids += b["image_id"][b["example_valid"]].tolist()
  assert num_batches == [2, 2]
  assert sorted(ids) == list(range(100, 100 + len(testdata.EVAL_IMAGES)))


def _shapes_config(tmp_path):
  config = ml_collections.ConfigDict()
  config.seed = 11
  config.batch_size = 4
  config.eval_batch_size = 4
  config.dataset = ml_collections.ConfigDict(dict(
      name="shapes", data_dir=str(tmp_path), image_size=48, num_train_examples=10,
      num_eval_examples=4, max_objects=4, augmentation="detr", flip=True, scales=[40, 48, 56],
      max_size=72, crop_resize_scales=[40, 48], crop_min_size=24, crop_max_size=40,
      eval_size=48, eval_max_size=72, buckets=[(48, 48), (72, 72)], max_boxes=3,
      shuffle_buffer=10))
  return config


@pytest.mark.parametrize("cache_train,resized", [(False, False), (True, False), (True, True)])
def test_resume_yields_the_same_batches(tmp_path, cache_train, resized):
  config = _shapes_config(tmp_path)
  config.dataset.cache_train = cache_train
  if resized:  # one fixed size: each image resized once, the batches made in numpy
    config.dataset.update(cache_train_resized=True, augmentation="fixed", scales=[40])
  full = input_pipeline.create_train_iterator(config, 0, 0, 1)
  assert full.steps_per_epoch == 2
  reference = [next(full) for _ in range(7)]
  assert full.num_dropped_boxes > 0  # max_objects 4 > max_boxes 3: counted
  for start in (3, 4):  # mid-epoch and on an epoch boundary
    resumed = input_pipeline.create_train_iterator(config, start, 0, 1)
    for step in range(start, 7):
      batch = next(resumed)
      for key, value in reference[step].items():
        np.testing.assert_array_equal(value, batch[key], err_msg=f"{key} at step {step}")
  # Epochs differ (reshuffled, re-augmented).
  assert not np.array_equal(reference[0]["boxes"], reference[2]["boxes"])
  config.seed = 12
  other = next(input_pipeline.create_train_iterator(config, 0, 0, 1))
  assert not np.array_equal(other["boxes"], reference[0]["boxes"])


def test_cached_epochs_are_uniform_shuffles_of_the_same_examples(tmp_path):
  config = _shapes_config(tmp_path)
  config.batch_size = 1  # an epoch is the whole split
  config.dataset.update(augmentation="fixed", flip=False, scales=[48], max_size=48)

  def epochs(cache_train, count=3):
    config.dataset.cache_train = cache_train
    it = input_pipeline.create_train_iterator(config, 0, 0, 1)
    assert it.steps_per_epoch == 10
    batches = [next(it) for _ in range(count * 10)]
    return [[_signature(b, 0) + (float(b["images"][0].sum()),) for b in batches[e * 10:][:10]]
            for e in range(count)]

  plain, cached = epochs(False), epochs(True)
  # Without augmentation an example's batch is a function of the record alone: every epoch of
  # both iterators holds each of the 10 records once, in an order of its own.
  assert len(set(plain[0])) == 10
  for epoch in plain + cached:
    assert sorted(epoch) == sorted(plain[0])
  assert cached[0] != cached[1] and cached[0] != plain[0]
  # The resized cache too (its image sums may differ from the tf.data path's by round-off).
  config.dataset.cache_train_resized = True
  resized = epochs(True)
  boxes_only = sorted(e[:-1] for e in plain[0])
  for epoch in resized:
    assert sorted(e[:-1] for e in epoch) == boxes_only
  assert resized[0] != resized[1]


def _decoded_train_examples(config):
  """The train split's decoded examples (crowd boxes removed) in record order."""
  source = sources.get_source(config.dataset)
  ds = source.builder.as_dataset(split=source.train_split, decoders=source.decoders,
                                 shuffle_files=False)
  return [input_pipeline._without_crowd(source.decode(raw)) for raw in ds]


def test_resized_cache_gives_the_augmented_examples(folder):
  # Each example of the resized cache, mirrored or not, is the tf.data augmentation of its
  # record with that flip: the same boxes, labels and padding, the image up to round-off.
  root, train, evaluation = folder
  config = testdata.config(root, train, evaluation, flip=True)
  config.dataset.update(cache_train=True, cache_train_resized=True, max_boxes=1)
  it = input_pipeline.create_train_iterator(config, 0, 0, 1)
  buckets = input_pipeline.sorted_buckets(config.dataset)
  examples = _decoded_train_examples(config)
  assert len(it._presized) == len(examples) == len(testdata.TRAIN_IMAGES)
  sizes = set()
  for cached, example in zip(it._presized, examples):
    height, width = example["image"].shape[:2]
    for flip in (False, True):
      _, region, out_size = transforms.train_geometry(
          tf.constant([5, 6], tf.int64), height, width, config.dataset)
      image, boxes, labels = transforms.apply_geometry(example, tf.constant(flip), region,
                                                       out_size)
      targets = input_pipeline._targets(boxes, labels, 1)
      batch = input_pipeline.presized_batch([cached], [flip], buckets)
      out_h, out_w = out_size.numpy()
      sizes.add((out_h, out_w))
      bucket = next(b for b in buckets if b[0] >= out_h and b[1] >= out_w)
      assert batch["images"].shape == (1, *bucket, 3)
      np.testing.assert_allclose(batch["images"][0, :out_h, :out_w], image.numpy(), rtol=0,
                                 atol=1e-4)
      assert not batch["images"][0, out_h:].any() and not batch["images"][0, :, out_w:].any()
      assert batch["pixel_mask"][0].sum() == out_h * out_w
      assert batch["pixel_mask"][0, :out_h, :out_w].all()
      np.testing.assert_allclose(batch["boxes"][0], targets["boxes"].numpy(), rtol=0, atol=1e-6)
      for key in ("labels", "valid", "num_dropped_boxes"):
        np.testing.assert_array_equal(batch[key][0], targets[key].numpy(), err_msg=key)
  assert len(sizes) > 2  # images of several sizes, padded to several buckets
  # A batch pads every image to the bucket holding the largest; mirrored rows stay padding.
  batch = input_pipeline.presized_batch(it._presized[:2], np.array([True, False]), buckets)
  heights = [e["image"].shape[0] for e in it._presized[:2]]
  widths = [e["image"].shape[1] for e in it._presized[:2]]
  assert batch["images"].shape[1:3] == next(
      b for b in buckets if b[0] >= max(heights) and b[1] >= max(widths))
  # max_boxes 1: each image with two boxes drops one.
  assert sum(int(e["num_dropped_boxes"]) for e in it._presized) == sum(
      len(rects) - 1 for _, _, rects in testdata.TRAIN_IMAGES)


def test_resized_cache_flips_about_half_and_every_epoch_anew(tmp_path):
  config = _shapes_config(tmp_path)
  config.dataset.update(cache_train=True, cache_train_resized=True, augmentation="fixed",
                        scales=[40])
  config.batch_size = 5
  it = input_pipeline.create_train_iterator(config, 0, 0, 1)
  cached = [e["image"] for e in it._presized]
  flips = np.zeros([20, 10], bool)  # [epoch, image]
  for step in range(40):  # 20 epochs of 10 images
    for image in next(it)["images"][:, :40, :40]:
      same = [np.array_equal(image, c) for c in cached]
      mirrored = [np.array_equal(image, c[:, ::-1]) for c in cached]
      assert sum(same) + sum(mirrored) == 1  # one cached image, as stored or mirrored
      flips[step // 2, int(np.argmax(np.add(same, mirrored)))] = any(mirrored)
  assert 0.35 < flips.mean() < 0.65
  assert 0 < flips.mean(axis=0).min() and flips.mean(axis=0).max() < 1  # redrawn every epoch


def test_pipelines_run_without_autotuning_and_give_the_same_batches(tmp_path, monkeypatch):
  # Ending an autotuned iterator waits for its autotuning thread (up to 60 s): every epoch and
  # every evaluation ends one. Without autotuning the batches must not change (the images up to
  # float round-off: 1.9e-5 seen).
  config = _shapes_config(tmp_path)
  real = input_pipeline.without_autotune

  def batches(wrap, cache_train):
    config.dataset.cache_train = cache_train
    monkeypatch.setattr(input_pipeline, "without_autotune", wrap)
    it = input_pipeline.create_train_iterator(config, 0, 0, 1)
    train = [next(it) for _ in range(5)]  # across two epoch boundaries (2 batches per epoch)
    return train + list(input_pipeline.create_eval_iterator(config, 0, 1))

  for cache_train in (False, True):
    autotuned = []

    def recording(ds):
      autotuned.append(ds.options().autotune.enabled)
      out = real(ds)
      autotuned.append(out.options().autotune.enabled)
      return out

    plain = batches(recording, cache_train)
    # Three train epochs and one evaluation, each turned from autotuned (None: tf.data's default,
    # on) to not.
    assert len(autotuned) == 8 and autotuned[1::2] == [False] * 4, autotuned
    assert all(enabled in (None, True) for enabled in autotuned[0::2]), autotuned
    tuned = batches(lambda ds: ds, cache_train)
    assert len(plain) == len(tuned) == 6
    for i, (a, b) in enumerate(zip(plain, tuned)):
      assert a.keys() == b.keys()
      for key in a:
        if key == "images":  # TF's resize may split its work differently: float round-off
          np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-4,
                                     err_msg=f"{key} of batch {i}")
        else:
          np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} of batch {i}")


def test_make_global_batch():
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  batch = {"images": np.arange(jax.device_count() * 6, dtype=np.float32).reshape(-1, 2, 3),
           "valid": np.ones([jax.device_count(), 4], bool)}
  global_batch = input_pipeline.make_global_batch(batch, mesh)
  np.testing.assert_array_equal(global_batch["images"], batch["images"])
  assert global_batch["valid"].sharding.spec == jax.sharding.PartitionSpec("data")
  assert len(global_batch["images"].addressable_shards) == jax.device_count()
