"""Image and box transforms of the DETR recipe, as TensorFlow ops for tf.data.

Every transform works on one decoded example in the common layout of `detr_jax.data`:

    image     uint8   [h, w, 3]
    boxes     float32 [n, 4]  xyxy in pixels of the original image
    labels    int32   [n]
    is_crowd  bool    [n]

All random choices are stateless (`tf.random.stateless_*`) and come from a per-example seed
`[2] int`, so an example's augmentation is a function of that seed only (resumable, reproducible).

Geometry. A transform is one *region* of the (optionally flipped) original image, given in
original pixels, and an output size. The official recipe's resize -> crop -> resize is exactly
such a region (the crop, taken in resized coordinates, mapped back to the original), so the image
is resampled once with `tf.image.crop_and_resize` using half-pixel centres: the same sampling
grid as `tf.image.resize(..., "bilinear")` (no antialiasing; PyTorch DETR uses PIL, which
antialiases when shrinking). Boxes are clipped to the region, boxes left with no area are dropped
(official `crop`), and the kept boxes are cxcywh normalised by the region, which is the same as
normalising by the unpadded output size.

Output size. The shorter side is resized to `size` with the longer side at most `max_size`
(official `get_size`), then, if the result fits no bucket, it is shrunk (aspect kept) to fit the
largest bucket (see `fit_to_buckets`).
"""

from typing import Sequence

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_size(height, width, size, max_size=None):
  """Output (h, w) of the official DETR resize (`get_size_with_aspect_ratio`).

  Args:
    height: original height (scalar tensor or number).
    width: original width.
    size: target length of the shorter side (scalar tensor or int).
    max_size: optional cap on the longer side (int or None).

  Returns:
    (h, w) int32 scalar tensors.
  """
  h = tf.cast(height, tf.float64)
  w = tf.cast(width, tf.float64)
  size = tf.cast(size, tf.float64)
  short = tf.minimum(h, w)
  long = tf.maximum(h, w)
  if max_size is not None:
    max_size = tf.constant(float(max_size), tf.float64)
    size = tf.where(long / short * size > max_size, tf.round(max_size * short / long), size)
  # int() of the official code truncates; both sides are positive, so floor.
  out_h = tf.where(w < h, tf.floor(size * h / w), size)
  out_w = tf.where(w < h, size, tf.floor(size * w / h))
  return tf.cast(out_h, tf.int32), tf.cast(out_w, tf.int32)


def fit_to_buckets(height, width, buckets: Sequence[Sequence[int]]):
  """Shrinks (h, w), keeping the aspect ratio, when it fits no bucket.

  Args:
    height: int32 scalar tensor.
    width: int32 scalar tensor.
    buckets: list of (H, W) padded shapes.

  Returns:
    (h, w) int32: unchanged when some bucket holds it, else the largest size of the same aspect
    that fits one of the buckets.
  """
  bucket_h = tf.constant([b[0] for b in buckets], tf.float64)
  bucket_w = tf.constant([b[1] for b in buckets], tf.float64)
  h = tf.cast(height, tf.float64)
  w = tf.cast(width, tf.float64)
  fits = tf.reduce_any((h <= bucket_h) & (w <= bucket_w))
  scale = tf.reduce_max(tf.minimum(bucket_h / h, bucket_w / w))
  new_h = tf.where(fits, h, tf.floor(h * scale))
  new_w = tf.where(fits, w, tf.floor(w * scale))
  return tf.cast(tf.maximum(new_h, 1.0), tf.int32), tf.cast(tf.maximum(new_w, 1.0), tf.int32)


def _randint(seed, low, high_inclusive):
  """Stateless uniform integer in [low, high_inclusive] (both scalar int32 tensors)."""
  high = tf.maximum(tf.cast(high_inclusive, tf.int32), tf.cast(low, tf.int32))
  return tf.random.stateless_uniform(
      [], seed, minval=tf.cast(low, tf.int32), maxval=high + 1, dtype=tf.int32)


def _choice(seed, values: Sequence[int]):
  values = tf.constant(list(values), tf.int32)
  return values[_randint(seed, 0, tf.size(values) - 1)]


def resample(image, region, out_size, flip):
  """Resamples a region of an image to out_size, optionally mirrored left-right.

  Args:
    image: uint8 or float [h, w, 3].
    region: float [4] (y0, x0, y1, x1) in pixels of the image *after* the optional flip.
    out_size: int32 [2] (out_h, out_w).
    flip: bool scalar; mirror the image before taking the region.

  Returns:
    float32 [out_h, out_w, 3] in the input's value range.
  """
  image = tf.cast(image, tf.float32)
  # One replicated border pixel, so half-pixel sample points just outside the image (upscaling)
  # read the edge instead of crop_and_resize's zero extrapolation.
  padded = tf.pad(image, [[1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  out_h = tf.cast(out_size[0], tf.float32)
  out_w = tf.cast(out_size[1], tf.float32)
  y0, x0, y1, x1 = region[0], region[1], region[2], region[3]
  step_y = (y1 - y0) / out_h
  step_x = (x1 - x0) / out_w
  # Half-pixel centres: output pixel i samples input coordinate y0 + (i + 0.5) * step - 0.5.
  start_y = y0 + 0.5 * step_y - 0.5
  start_x = x0 + 0.5 * step_x - 0.5
  # In the mirrored image, column x is column (w - 1 - x) of the stored one.
  start_x, step_x = (tf.where(flip, w - 1.0 - start_x, start_x), tf.where(flip, -step_x, step_x))
  end_y = start_y + step_y * (out_h - 1.0)
  end_x = start_x + step_x * (out_w - 1.0)
  # +1: the border pixel; crop_and_resize maps normalised 0..1 to pixel 0..(size - 1).
  denom_y = tf.maximum(h + 1.0, 1.0)
  denom_x = tf.maximum(w + 1.0, 1.0)
  box = tf.stack([(start_y + 1.0) / denom_y, (start_x + 1.0) / denom_x,
                  (end_y + 1.0) / denom_y, (end_x + 1.0) / denom_x])
  out = tf.image.crop_and_resize(
      padded[None], box[None], tf.zeros([1], tf.int32), tf.cast(out_size, tf.int32),
      method="bilinear")
  return out[0]


def flip_boxes(boxes, width, flip):
  """Mirrors xyxy pixel boxes left-right in an image of the given width when flip is True."""
  width = tf.cast(width, tf.float32)
  x0, y0, x1, y1 = tf.unstack(boxes, axis=-1)
  flipped = tf.stack([width - x1, y0, width - x0, y1], axis=-1)
  return tf.where(flip, flipped, boxes)


def boxes_to_region(boxes, region):
  """Clips xyxy pixel boxes to a region and normalises them by it.

  Args:
    boxes: float32 [n, 4] xyxy in pixels.
    region: float32 [4] (y0, x0, y1, x1) in the same pixels.

  Returns:
    (boxes_cxcywh [n, 4] in [0, 1] of the region, keep bool [n]): keep is False on boxes with
    no area left inside the region (the official crop drops those).
  """
  y0, x0, y1, x1 = region[0], region[1], region[2], region[3]
  bx0 = tf.clip_by_value(boxes[:, 0], x0, x1)
  by0 = tf.clip_by_value(boxes[:, 1], y0, y1)
  bx1 = tf.clip_by_value(boxes[:, 2], x0, x1)
  by1 = tf.clip_by_value(boxes[:, 3], y0, y1)
  keep = (bx1 > bx0) & (by1 > by0)
  rw = x1 - x0
  rh = y1 - y0
  cxcywh = tf.stack([((bx0 + bx1) / 2 - x0) / rw, ((by0 + by1) / 2 - y0) / rh,
                     (bx1 - bx0) / rw, (by1 - by0) / rh], axis=-1)
  return cxcywh, keep


def normalize_image(image):
  """float [h, w, 3] in 0..255 -> ImageNet mean/std normalised float32."""
  mean = tf.constant(IMAGENET_MEAN, tf.float32) * 255.0
  std = tf.constant(IMAGENET_STD, tf.float32) * 255.0
  return (tf.cast(image, tf.float32) - mean) / std


def _detr_crop_region(seed, height, width, ds_config):
  """Region (original pixels) of the official resize-to-{400,500,600} + RandomSizeCrop."""
  seed_size, seed_h, seed_w, seed_i, seed_j = tf.unstack(
      tf.random.experimental.stateless_split(seed, 5))
  rh, rw = resized_size(height, width, _choice(seed_size, ds_config.crop_resize_scales), None)
  min_size = int(ds_config.crop_min_size)
  max_size = int(ds_config.crop_max_size)
  # torchvision randint(min_size, min(dim, max_size) + 1): inclusive upper bound.
  crop_h = _randint(seed_h, tf.minimum(min_size, rh), tf.minimum(rh, max_size))
  crop_w = _randint(seed_w, tf.minimum(min_size, rw), tf.minimum(rw, max_size))
  top = _randint(seed_i, 0, rh - crop_h)
  left = _randint(seed_j, 0, rw - crop_w)
  scale_y = tf.cast(height, tf.float32) / tf.cast(rh, tf.float32)
  scale_x = tf.cast(width, tf.float32) / tf.cast(rw, tf.float32)
  region = tf.stack([tf.cast(top, tf.float32) * scale_y, tf.cast(left, tf.float32) * scale_x,
                     tf.cast(top + crop_h, tf.float32) * scale_y,
                     tf.cast(left + crop_w, tf.float32) * scale_x])
  return region, crop_h, crop_w


def train_geometry(seed, height, width, ds_config):
  """Random flip, region and output size of one training example.

  Args:
    seed: [2] int stateless seed of the example.
    height: int32 original height.
    width: int32 original width.
    ds_config: config.dataset (augmentation, scales, max_size, crop_*, buckets, flip).

  Returns:
    (flip bool, region float32 [4] in pixels of the flipped original, out_size int32 [2]).
  """
  seed_flip, seed_branch, seed_crop, seed_scale = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  augmentation = ds_config.get("augmentation", "detr")
  if augmentation not in ("detr", "fixed"):
    raise ValueError(f"config.dataset.augmentation={augmentation!r}: use 'detr' or 'fixed'.")
  if ds_config.get("flip", True):
    flip = tf.random.stateless_uniform([], seed_flip) < 0.5
  else:
    flip = tf.constant(False)
  full = tf.stack([0.0, 0.0, tf.cast(height, tf.float32), tf.cast(width, tf.float32)])
  if augmentation == "detr":
    crop_region, crop_h, crop_w = _detr_crop_region(seed_crop, height, width, ds_config)
    use_crop = tf.random.stateless_uniform([], seed_branch) < 0.5
    region = tf.where(use_crop, crop_region, full)
    # The final multi-scale resize sees the crop's size in resized pixels.
    src_h = tf.where(use_crop, crop_h, tf.cast(height, tf.int32))
    src_w = tf.where(use_crop, crop_w, tf.cast(width, tf.int32))
  else:
    region, src_h, src_w = full, height, width
  out_h, out_w = resized_size(src_h, src_w, _choice(seed_scale, ds_config.scales),
                              ds_config.max_size)
  out_h, out_w = fit_to_buckets(out_h, out_w, ds_config.buckets)
  return flip, region, tf.stack([out_h, out_w])


def eval_geometry(height, width, ds_config):
  """Fixed output size (eval_size, eval_max_size, bucket fit) of an evaluation example."""
  out_h, out_w = resized_size(height, width, ds_config.eval_size, ds_config.eval_max_size)
  out_h, out_w = fit_to_buckets(out_h, out_w, ds_config.buckets)
  return tf.stack([out_h, out_w])


def apply_geometry(example, flip, region, out_size):
  """Applies (flip, region, out_size) to an example's image and boxes.

  Args:
    example: dict with image uint8 [h, w, 3], boxes float32 [n, 4] xyxy pixels, labels [n].
    flip: bool scalar.
    region: float32 [4] in pixels of the flipped original.
    out_size: int32 [2].

  Returns:
    (image float32 [out_h, out_w, 3] normalised, boxes [k, 4] cxcywh in [0, 1], labels [k]):
    only the boxes with area left in the region.
  """
  image = example["image"]
  width = tf.shape(image)[1]
  resized = resample(image, region, out_size, flip)
  boxes = flip_boxes(tf.cast(example["boxes"], tf.float32), width, flip)
  boxes, keep = boxes_to_region(boxes, region)
  return (normalize_image(resized), tf.boolean_mask(boxes, keep),
          tf.boolean_mask(example["labels"], keep))
