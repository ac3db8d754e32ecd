"""Input pipeline: TFDS records -> augmented, padded, bucketed numpy batches for the train step.

Public API:

    info = dataset_info(config.dataset)
    it = create_train_iterator(config, start_step=0, process_index=None, process_count=None)
    it = create_eval_iterator(config, process_index=None, process_count=None)
    batch = make_global_batch(local_batch, mesh)

Determinism and resume. Each process reads its own shard of the train split
(`tfds.even_splits(..., drop_remainder=True)`, equal sizes). An epoch is `steps_per_epoch` local
batches, `steps_per_epoch = usable examples per shard // local batch`, the same on every process.
Epoch e reads the shard with TFDS file shuffling and a shuffle buffer, both seeded by
(config.seed, e); example j of the epoch is augmented with stateless random ops seeded by
(config.seed, e, process_index, j). So, for a given number of processes, batch k is a function
of (config.seed, k) only (a run resumed on a different number of hosts reads other shards), and
`start_step=k` starts at epoch k // steps_per_epoch and skips (k % steps_per_epoch) * b records
of that epoch before their images are decoded.

`config.dataset.cache_train` (default False) trades memory for input time on a small dataset:
each process decodes its shard once and keeps the decoded images in memory (about
height x width x 3 bytes each: 375 MB for the 8,000 128 x 128 shapes images); each epoch is then a
uniform shuffle of the whole shard seeded by (config.seed, e), instead of TFDS file shuffling and
the shuffle buffer. So it reads another order of the same examples (batch k is still a function of
(config.seed, k)), and the augmentation is unchanged.

`config.dataset.cache_train_resized` (default False; with `cache_train`, the "fixed"
augmentation and one scale) goes further: the geometry of such an example is the same every epoch
but for its flip, so each image is resized to its training size and normalised once, and kept
as float32 (out_h x out_w x 12 bytes: 844 MB for the shapes images at 96 px). A batch is then
gathered, mirrored and padded in numpy, with no per-example TensorFlow work: about 1 ms of CPU
per batch of 16 96 x 96 shapes images against about 11 with the tf.data augmentation
(experiments/bench_feed.py, 2-core CPU), time the train step gets back. The flips come from
numpy's generator seeded by (config.seed, e, process_index, batch index) and the epoch's order
from a numpy permutation seeded by (config.seed, e), so batch k is a function of (config.seed, k)
as above, but these are other flips and another order than `cache_train`'s alone; and an image
mirrored after its resize differs from one resized mirrored by float round-off (within 1e-4,
tests/test_input_pipeline.py). A mirrored box is (1 - cx, cy, w, h).

Static shapes. Each batch is padded (bottom/right, `pixel_mask` False there) to the smallest
bucket of config.dataset.buckets that holds every image of the batch; an image that fits no
bucket is first resized down, aspect kept, to fit the largest one. The buckets must include one
that holds all the others. Targets are padded to config.dataset.max_boxes with `valid`; boxes
beyond it are dropped, counted and logged (`TrainIterator.num_dropped_boxes`).

Training drops crowd boxes and boxes without area; images without any training box are not used
for training (they stay in evaluation). Eval batches also carry every original annotation for
COCO evaluation; every eval example appears exactly once across all processes.

Eval padding does not depend on the batch. Each eval image is padded on its own
(`eval_padded_size`), then images of the same padded shape are batched together (a short batch is
completed with filler examples, `example_valid` False). So an image's detections, and the AP, are
the same for any eval batch size and any number of devices or processes.
`config.dataset.eval_padding` chooses the padded shape:
  "bucket" (default): the smallest of config.dataset.buckets that holds the image; one program
    per bucket.
  "image": the image's own size rounded up to `config.dataset.eval_pad_multiple` (32, the
    backbone's stride): the least padding, as the official DETR evaluated at one image per GPU,
    at the price of one program per distinct rounded size.
"""

import functools
from typing import Any, Iterator, NamedTuple

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from detr_jax import config_checks
from detr_jax.data import sources
from detr_jax.data import transforms

tf.config.set_visible_devices([], "GPU")  # tf.data only: keep TensorFlow off the accelerators

_COUNT_CACHE = {}


class DatasetInfo(NamedTuple):
  num_classes: int  # max label id + 1 (the model's config.model.num_classes)
  class_names: dict
  num_train_examples: int
  num_eval_examples: int


def dataset_info(ds_config) -> DatasetInfo:
  """Number of classes, class names and split sizes of config.dataset (prepares it if needed)."""
  source = sources.get_source(ds_config)
  splits = source.builder.info.splits
  sizes = [splits[s].num_examples if s in splits else 0  # a folder without eval files
           for s in (source.train_split, source.eval_split)]
  return DatasetInfo(source.num_classes, dict(source.class_names), *sizes)


def resolve_config(config: ml_collections.ConfigDict, info) -> ml_collections.ConfigDict:
  """Returns a copy of `config` with dataset-dependent fields filled and checked.

  `model.num_classes <= 0` takes the dataset's `num_classes`; `steps_per_epoch <= 0` is computed
  from the number of training examples.

  Raises:
    ValueError: when the model has fewer classes than the dataset's labels need.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.num_classes <= 0:
    config.model.num_classes = int(info.num_classes)
  elif config.model.num_classes < info.num_classes:
    raise ValueError(
        f"config.model.num_classes={config.model.num_classes} but the dataset's labels go up to "
        f"{info.num_classes - 1}; set --config.model.num_classes={info.num_classes} (or -1 to "
        "take it from the dataset).")
  if config.get("steps_per_epoch", -1) <= 0:
    config.steps_per_epoch = max(int(info.num_train_examples) // config.batch_size, 1)
  return config


def _process(process_index, process_count):
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  return process_index, process_count


def _local_batch_size(batch_size, process_count, what):
  if batch_size % process_count:
    raise ValueError(f"config.{what}={batch_size} does not divide by the {process_count} "
                     "processes: use a multiple of the process count.")
  return batch_size // process_count


def sorted_buckets(ds_config):
  """Buckets sorted smallest first; checks one of them holds all the others."""
  buckets = sorted({(int(h), int(w)) for h, w in ds_config.buckets}, key=lambda b: (b[0] * b[1], b))
  if not buckets:
    raise ValueError("config.dataset.buckets is empty: give at least one (height, width).")
  max_h = max(b[0] for b in buckets)
  max_w = max(b[1] for b in buckets)
  if (max_h, max_w) not in buckets:
    raise ValueError(f"config.dataset.buckets={buckets} has no bucket that holds all the others, "
                     f"so a batch mixing them would fit none: add ({max_h}, {max_w}).")
  return buckets


EVAL_PADDINGS = ("bucket", "image")


def eval_padding(ds_config) -> tuple[str, int]:
  """(config.dataset.eval_padding, eval_pad_multiple), checked."""
  mode = str(ds_config.get("eval_padding", "bucket"))
  multiple = int(ds_config.get("eval_pad_multiple", 32))
  if mode not in EVAL_PADDINGS:
    raise ValueError(f"config.dataset.eval_padding={mode!r}: use one of {EVAL_PADDINGS}.")
  if multiple < 1:
    raise ValueError(f"config.dataset.eval_pad_multiple={multiple}: use 1 or more.")
  return mode, multiple


def eval_padded_size(height: int, width: int, ds_config) -> tuple[int, int]:
  """The (H, W) an eval or prediction input of (height, width) is padded to, whatever its batch."""
  mode, multiple = eval_padding(ds_config)
  if mode == "image":
    return -(-int(height) // multiple) * multiple, -(-int(width) // multiple) * multiple
  for bucket in sorted_buckets(ds_config):
    if height <= bucket[0] and width <= bucket[1]:
      return bucket
  raise ValueError(f"An image of {(height, width)} fits no bucket of {ds_config.buckets}.")


def _eval_pad_example(example, ds_config, buckets):
  """Pads one eval example's image and pixel_mask to `eval_padded_size` (tf version)."""
  height = tf.shape(example["images"])[0]
  width = tf.shape(example["images"])[1]
  mode, multiple = eval_padding(ds_config)
  if mode == "image":
    target_h = (height + multiple - 1) // multiple * multiple
    target_w = (width + multiple - 1) // multiple * multiple
  else:
    target_h, target_w = _smallest_bucket(height, width, buckets)
  example = dict(example)
  pad = [[0, target_h - height], [0, target_w - width]]
  example["images"] = tf.pad(example["images"], pad + [[0, 0]])
  example["pixel_mask"] = tf.pad(example["pixel_mask"], pad)
  return example


def _shape_key(example):
  shape = tf.cast(tf.shape(example["images"])[:2], tf.int64)
  return shape[0] * 1_000_003 + shape[1]


def _smallest_bucket(height, width, buckets):
  """(H, W) tensors of the first bucket holding (height, width); buckets sorted smallest first."""
  bucket_h = tf.constant([b[0] for b in buckets], tf.int32)
  bucket_w = tf.constant([b[1] for b in buckets], tf.int32)
  index = tf.argmax(tf.cast((bucket_h >= height) & (bucket_w >= width), tf.int32))  # first fit
  return bucket_h[index], bucket_w[index]


def _pad_to_bucket(batch, buckets):
  """Pads a batch (padded to its largest image) to the smallest bucket that holds it."""
  height = tf.shape(batch["images"])[1]
  width = tf.shape(batch["images"])[2]
  bucket_h, bucket_w = _smallest_bucket(height, width, buckets)
  pad_h = bucket_h - height
  pad_w = bucket_w - width
  batch = dict(batch)
  batch["images"] = tf.pad(batch["images"], [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])
  batch["pixel_mask"] = tf.pad(batch["pixel_mask"], [[0, 0], [0, pad_h], [0, pad_w]])
  return batch


def presized_batch(examples, flips, buckets):
  """A training batch from resized examples (`TrainIterator._presized_examples`) in numpy.

  Args:
    examples: list of b dicts: image float32 [h, w, 3], labels [M], boxes [M, 4] cxcywh,
      valid [M], num_dropped_boxes scalar.
    flips: bool [b]; mirror example i left-right.
    buckets: sorted_buckets(config.dataset).

  Returns:
    The dict the tf.data path gives: images [b, H, W, 3] and pixel_mask [b, H, W] padded
    bottom/right to the smallest bucket holding every image, labels, boxes (cx mirrored to
    1 - cx on valid rows of mirrored examples), valid, num_dropped_boxes [b].
  """
  height = max(e["image"].shape[0] for e in examples)
  width = max(e["image"].shape[1] for e in examples)
  bucket_h, bucket_w = next((h, w) for h, w in buckets if h >= height and w >= width)
  images = np.zeros([len(examples), bucket_h, bucket_w, 3], np.float32)
  pixel_mask = np.zeros([len(examples), bucket_h, bucket_w], bool)
  for i, (example, flip) in enumerate(zip(examples, flips)):
    h, w = example["image"].shape[:2]
    images[i, :h, :w] = example["image"][:, ::-1] if flip else example["image"]
    pixel_mask[i, :h, :w] = True
  boxes = np.stack([e["boxes"] for e in examples])
  valid = np.stack([e["valid"] for e in examples])
  mirrored = np.asarray(flips)[:, None] & valid
  boxes[..., 0] = np.where(mirrored, np.float32(1) - boxes[..., 0], boxes[..., 0])
  return {"images": images, "pixel_mask": pixel_mask,
          "labels": np.stack([e["labels"] for e in examples]), "boxes": boxes, "valid": valid,
          "num_dropped_boxes": np.stack([e["num_dropped_boxes"] for e in examples])}


def _pad_rows(values, max_boxes):
  """Pads/truncates the leading axis of values to max_boxes."""
  values = values[:max_boxes]
  padding = [[0, max_boxes - tf.shape(values)[0]]] + [[0, 0]] * (len(values.shape) - 1)
  return tf.pad(values, padding)


def _targets(boxes, labels, max_boxes):
  num = tf.shape(labels)[0]
  return {
      "labels": _pad_rows(tf.cast(labels, tf.int32), max_boxes),
      "boxes": tf.ensure_shape(_pad_rows(boxes, max_boxes), [max_boxes, 4]),
      "valid": tf.range(max_boxes) < num,
      "num_dropped_boxes": tf.maximum(num - max_boxes, 0),
  }


def _without_crowd(example):
  keep = tf.logical_not(example["is_crowd"])
  example = dict(example)
  example["boxes"] = tf.boolean_mask(example["boxes"], keep)
  example["labels"] = tf.boolean_mask(example["labels"], keep)
  return example


def _example_seed(seed, epoch, process_index, position):
  key = tf.constant([seed & 0x7FFFFFFF, 0x5EED], tf.int64)
  for data in (epoch, process_index):
    key = tf.random.experimental.stateless_fold_in(key, data)
  return tf.random.experimental.stateless_fold_in(key, position)


def _train_example(position, raw, *, source, ds_config, seed, epoch, process_index, max_boxes):
  return _augment(position, _without_crowd(source.decode(raw)), ds_config=ds_config, seed=seed,
                  epoch=epoch, process_index=process_index, max_boxes=max_boxes)


def _augment(position, example, *, ds_config, seed, epoch, process_index, max_boxes):
  """A decoded example (crowd boxes removed) -> the augmented training example at `position`."""
  height = tf.shape(example["image"])[0]
  width = tf.shape(example["image"])[1]
  key = _example_seed(seed, epoch, process_index, position)
  flip, region, out_size = transforms.train_geometry(key, height, width, ds_config)
  image, boxes, labels = transforms.apply_geometry(example, flip, region, out_size)
  return {"images": image, "pixel_mask": tf.ones(out_size, tf.bool),
          **_targets(boxes, labels, max_boxes)}


def _count_usable(source, split):
  """Records of split with a training box (counted once per process, then cached)."""
  if source.all_train_usable:
    return source.builder.info.splits[split].num_examples
  key = (str(source.builder.data_path), str(split))
  if key not in _COUNT_CACHE:
    logging.info("Counting the images with a training box in %s (one pass, boxes only).", split)
    ds = source.builder.as_dataset(split=split, decoders=source.decoders)
    ds = ds.filter(source.has_training_boxes)
    _COUNT_CACHE[key] = int(ds.reduce(np.int64(0), lambda n, _: n + 1).numpy())
  return _COUNT_CACHE[key]


def without_autotune(ds: tf.data.Dataset) -> tf.data.Dataset:
  """`ds` without tf.data's autotuning thread.

  The train loop ends an iterator at every epoch, an evaluation at every eval. Destroying an
  autotuned iterator joins its autotuning thread, which sleeps up to 60 s between rounds
  (`kOptimizationPeriodMaxMs` in TensorFlow's tensorflow/core/framework/model.h): the train loop
  then waited 17-29 s for the first batch of a new epoch at most epoch boundaries after the
  first few minutes, with every thread of the process asleep. The batches are the same either
  way (every map here is `deterministic=True`): boxes, labels and masks exactly, the images up to
  float round-off of their resize (at most 1.9e-5 seen).
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)


def _epoch_seed(seed, epoch):
  return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch]).generate_state(1)[0] & 0x7FFFFFFF)


class TrainIterator(Iterator[dict]):
  """Infinite iterator of this process's training batches (numpy dicts); see module docstring.

  Attributes:
    steps_per_epoch: local batches per epoch (the same on every process).
    step: index of the next batch.
    num_dropped_boxes: boxes dropped so far because an image had more than max_boxes.
    num_dropped_images: records of the shard skipped for having no training box.
  """

  def __init__(self, config, start_step, process_index, process_count):
    ds_config = config.dataset
    self._config = config
    self._process_index = process_index
    self._source = sources.get_source(ds_config)
    self._buckets = sorted_buckets(ds_config)
    self._batch_size = _local_batch_size(config.batch_size, process_count, "batch_size")
    self._splits = tfds.even_splits(self._source.train_split, n=process_count,
                                    drop_remainder=True)
    split_sizes = [self._source.builder.info.splits[s].num_examples for s in self._splits]
    if min(split_sizes) == 0:
      raise ValueError(f"Train split {self._source.train_split!r} of {ds_config.name} has "
                       f"{sum(split_sizes)} examples, too few for {process_count} processes.")
    # Every process must agree on the epoch length: the smallest shard sets it.
    usable = min(_count_usable(self._source, s) for s in self._splits)
    self.num_dropped_images = split_sizes[process_index] - _count_usable(
        self._source, self._splits[process_index])
    if self.num_dropped_images:
      logging.info("%d train images have no training box (only crowd or empty boxes) and are "
                   "not used for training.", self.num_dropped_images)
    self.steps_per_epoch = usable // self._batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"The train shard holds {usable} usable images, fewer than one local "
                       f"batch of {self._batch_size}: lower config.batch_size or add images.")
    self.step = int(start_step)
    self.num_dropped_boxes = 0
    self._cached = self._presized = None
    if ds_config.get("cache_train_resized", False):
      config_checks.check_cache_train_resized(ds_config)
      self._presized = self._presized_examples()
    elif ds_config.get("cache_train", False):
      self._cached = self._cached_examples()
    self._batches = (self._generate_presized(self.step) if self._presized is not None
                     else self._generate(self.step))

  def _usable_records(self, **read_options):
    """This process's shard of raw train records with a training box (`as_dataset` options)."""
    ds = self._source.builder.as_dataset(split=self._splits[self._process_index],
                                         decoders=self._source.decoders, **read_options)
    if not self._source.all_train_usable:
      ds = ds.filter(self._source.has_training_boxes)
    return ds

  def _cached_examples(self):
    """(the shard's usable examples, decoded, crowd boxes removed, in record order and cached in
    memory by tf.data, their number) for `config.dataset.cache_train`."""
    ds = self._usable_records(shuffle_files=False).map(
        lambda raw: _without_crowd(self._source.decode(raw)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.cache()
    num_examples, num_bytes = ds.reduce(
        (np.int64(0), np.int64(0)),
        lambda acc, ex: (acc[0] + 1, acc[1] + tf.size(ex["image"], tf.int64)))  # fills the cache
    logging.info("config.dataset.cache_train: %d decoded training images (%.0f MB) of this "
                 "process are kept in memory.", int(num_examples), int(num_bytes) / 2**20)
    return ds, int(num_examples)

  def _epoch_dataset(self, epoch, skip_batches):
    ds_config = self._config.dataset
    epoch_seed = _epoch_seed(int(self._config.seed), epoch)
    if self._cached is not None:
      # A uniform shuffle of the whole shard (the buffer holds references to the cached tensors).
      cached, num_examples = self._cached
      ds = cached.shuffle(num_examples, seed=epoch_seed, reshuffle_each_iteration=False)
      return self._finish_epoch(ds, _augment, epoch, skip_batches)
    read_config = tfds.ReadConfig(shuffle_seed=epoch_seed, try_autocache=False)
    ds = self._usable_records(shuffle_files=True, read_config=read_config)
    ds = ds.shuffle(int(ds_config.get("shuffle_buffer", 1000)), seed=epoch_seed)
    return self._finish_epoch(ds, functools.partial(_train_example, source=self._source), epoch,
                              skip_batches)

  def _finish_epoch(self, ds, example_fn, epoch, skip_batches):
    """The epoch's shuffled records -> its batches, from batch `skip_batches` on."""
    ds_config = self._config.dataset
    epoch_examples = self.steps_per_epoch * self._batch_size
    start = skip_batches * self._batch_size
    ds = ds.take(epoch_examples).skip(start).enumerate(start=start)
    map_fn = functools.partial(
        example_fn, ds_config=ds_config, seed=int(self._config.seed),
        epoch=epoch, process_index=self._process_index, max_boxes=int(ds_config.max_boxes))
    ds = ds.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.padded_batch(self._batch_size, drop_remainder=True)
    ds = ds.map(functools.partial(_pad_to_bucket, buckets=self._buckets))
    return without_autotune(ds.prefetch(2))

  def _presized_examples(self):
    """This shard's usable examples resized once (`config.dataset.cache_train_resized`): a list
    of numpy dicts, each an unflipped training example (image float32 [h, w, 3] normalised,
    labels, boxes, valid, num_dropped_boxes), in record order."""
    ds_config = self._config.dataset
    max_boxes = int(ds_config.max_boxes)

    def presize(raw):
      example = _without_crowd(self._source.decode(raw))
      height = tf.shape(example["image"])[0]
      width = tf.shape(example["image"])[1]
      # "fixed" at one scale: the region and size do not depend on the seed, only the flip does.
      _, region, out_size = transforms.train_geometry(
          tf.zeros([2], tf.int64), height, width, ds_config)
      image, boxes, labels = transforms.apply_geometry(example, tf.constant(False), region,
                                                       out_size)
      return {"image": image, **_targets(boxes, labels, max_boxes)}

    ds = self._usable_records(shuffle_files=False).map(
        presize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    examples = list(without_autotune(ds).as_numpy_iterator())
    num_bytes = sum(e["image"].nbytes for e in examples)
    logging.info("config.dataset.cache_train_resized: %d training images of this process, "
                 "resized and normalised (%.0f MB), are kept in memory.", len(examples),
                 num_bytes / 2**20)
    return examples

  def _generate_presized(self, start_step):
    """Batches of the resized cache from `start_step` on: numpy only."""
    seed = int(self._config.seed) & 0xFFFFFFFF
    flip = bool(self._config.dataset.get("flip", True))
    epoch, batch_index = divmod(start_step, self.steps_per_epoch)
    while True:
      order = np.random.default_rng(_epoch_seed(seed, epoch)).permutation(len(self._presized))
      for k in range(batch_index, self.steps_per_epoch):
        rng = np.random.default_rng([seed, epoch, self._process_index, k])
        flips = (rng.random(self._batch_size) < 0.5) & flip
        chosen = order[k * self._batch_size:(k + 1) * self._batch_size]
        yield presized_batch([self._presized[i] for i in chosen], flips, self._buckets)
      epoch += 1
      batch_index = 0

  def _generate(self, start_step):
    epoch, skip_batches = divmod(start_step, self.steps_per_epoch)
    while True:
      for batch in self._epoch_dataset(epoch, skip_batches).as_numpy_iterator():
        yield batch
      epoch += 1
      skip_batches = 0

  def __next__(self) -> dict:
    batch = next(self._batches)
    dropped = int(batch.pop("num_dropped_boxes").sum())
    if dropped:
      self.num_dropped_boxes += dropped
      logging.warning("Step %d: %d boxes beyond config.dataset.max_boxes=%d dropped (%d so far).",
                      self.step, dropped, self._config.dataset.max_boxes, self.num_dropped_boxes)
    self.step += 1
    return batch


def create_train_iterator(config, start_step: int = 0, process_index=None,
                          process_count=None) -> TrainIterator:
  """Infinite iterator over this process's training batches.

  Args:
    config: the experiment config (seed, batch_size, dataset).
    start_step: index of the first batch; the batches equal those an iterator started at 0
      yields from this step on.
    process_index: this process (default jax.process_index()).
    process_count: number of processes (default jax.process_count()).

  Returns:
    A TrainIterator of numpy dicts: images float32 [b, H, W, 3], pixel_mask bool [b, H, W],
    labels int32 [b, M], boxes float32 [b, M, 4] cxcywh in [0, 1] of the unpadded image,
    valid bool [b, M]; (H, W) one of config.dataset.buckets, b = batch_size // process_count.
  """
  process_index, process_count = _process(process_index, process_count)
  return TrainIterator(config, start_step, process_index, process_count)


def _eval_example(raw, *, source, ds_config, max_boxes):
  example = source.decode(raw)
  height = tf.shape(example["image"])[0]
  width = tf.shape(example["image"])[1]
  out_size = transforms.eval_geometry(height, width, ds_config)
  region = tf.stack([0.0, 0.0, tf.cast(height, tf.float32), tf.cast(width, tf.float32)])
  image, boxes, labels = transforms.apply_geometry(
      _without_crowd(example), tf.constant(False), region, out_size)
  gt_xyxy = example["boxes"]
  gt_xywh = tf.concat([gt_xyxy[:, :2], gt_xyxy[:, 2:] - gt_xyxy[:, :2]], axis=-1)
  num_gt = tf.shape(example["labels"])[0]
  targets = _targets(boxes, labels, max_boxes)
  targets["num_dropped_boxes"] += tf.maximum(num_gt - max_boxes, 0)
  return {
      "images": image, "pixel_mask": tf.ones(out_size, tf.bool), **targets,
      "image_id": example["image_id"],
      "orig_size": tf.stack([height, width]),
      "example_valid": tf.constant(True),
      "gt_boxes": tf.ensure_shape(_pad_rows(gt_xywh, max_boxes), [max_boxes, 4]),
      "gt_labels": _pad_rows(example["labels"], max_boxes),
      "gt_is_crowd": _pad_rows(example["is_crowd"], max_boxes),
      "gt_area": _pad_rows(example["area"], max_boxes),
      "gt_valid": tf.range(max_boxes) < num_gt,
  }


def _pad_batch(batch, batch_size):
  """Pads a short numpy batch with zero rows (example_valid False) to batch_size rows."""
  return {name: np.pad(value, [(0, batch_size - value.shape[0])] + [(0, 0)] * (value.ndim - 1))
          for name, value in batch.items()}


def create_eval_iterator(config, process_index=None, process_count=None) -> Iterator[dict]:
  """Finite iterator over this process's evaluation batches.

  Together the processes' batches hold every example of the eval split exactly once (filler rows
  have example_valid False); processes may yield different numbers of batches, of different
  shapes: each batch holds images of one padded shape (see the module docstring).

  Args:
    config: the experiment config (eval_batch_size, dataset).
    process_index: this process (default jax.process_index()).
    process_count: number of processes (default jax.process_count()).

  Yields:
    numpy dicts with the train keys plus image_id int64 [b], orig_size int32 [b, 2] (h, w),
    example_valid bool [b], gt_boxes float32 [b, M, 4] xywh original pixels (incl. crowd),
    gt_labels int32 [b, M], gt_is_crowd bool [b, M], gt_area float32 [b, M], gt_valid bool [b, M].
  """
  process_index, process_count = _process(process_index, process_count)
  ds_config = config.dataset
  source = sources.get_source(ds_config)
  buckets = sorted_buckets(ds_config)
  batch_size = _local_batch_size(config.eval_batch_size, process_count, "eval_batch_size")
  if source.eval_split not in source.builder.info.splits:
    raise ValueError(f"{ds_config.name} has no split {source.eval_split!r} (splits: "
                     f"{list(source.builder.info.splits)}): for coco_folder set "
                     "config.dataset.eval_annotations_file and eval_images_dir.")
  splits = tfds.even_splits(source.eval_split, n=process_count, drop_remainder=False)
  sizes = [source.builder.info.splits[s].num_examples for s in splits]
  if sum(sizes) == 0:
    raise ValueError(f"Eval split {source.eval_split!r} of {ds_config.name} is empty.")
  if min(sizes) == 0:
    raise ValueError(f"Eval split {source.eval_split!r} of {ds_config.name} has {sum(sizes)} "
                     f"examples, fewer than the {process_count} processes: each needs one.")
  eval_padding(ds_config)
  max_boxes = int(ds_config.max_boxes)
  ds = source.builder.as_dataset(split=splits[process_index], shuffle_files=False,
                                 decoders=source.decoders)
  ds = ds.map(functools.partial(_eval_example, source=source, ds_config=ds_config,
                                max_boxes=max_boxes),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.map(functools.partial(_eval_pad_example, ds_config=ds_config, buckets=buckets),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # Batches of one padded shape each (the last of each shape may be short).
  ds = ds.group_by_window(_shape_key, lambda _, window: window.batch(batch_size),
                          window_size=batch_size)
  return _eval_batches(without_autotune(ds.prefetch(2)), batch_size, max_boxes)


def _eval_batches(ds, batch_size, max_boxes):
  num_dropped = 0
  for batch in ds.as_numpy_iterator():
    num_dropped += int(batch.pop("num_dropped_boxes").sum())
    yield _pad_batch(batch, batch_size)
  if num_dropped:
    logging.warning("Eval: %d boxes beyond config.dataset.max_boxes=%d were left out.",
                    num_dropped, max_boxes)


def make_global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> Any:
  """Assembles the processes' local batches into global jax.Arrays sharded on mesh axis "data".

  Args:
    local_batch: this process's numpy batch (leading axis = local batch).
    mesh: the device mesh with a "data" axis.

  Returns:
    The same tree of jax.Arrays with global batch = local batch * process count.
  """
  from detr_jax import parallel  # pylint: disable=g-import-not-at-top
  return parallel.global_batch(local_batch, mesh)
