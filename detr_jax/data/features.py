"""The TFDS feature schema shared by the shapes and COCO-folder builders, and its decoder.

Stored example (one image):

    image       encoded image (PNG/JPEG bytes), decoded to uint8 [h, w, 3]
    image_id    int64
    objects     sequence of
      bbox      float32 [4]  xyxy in pixels of the stored image
      label     int64        the model's label id
      is_crowd  bool
      area      float32      annotation area in pixels (COCO "area")

`decode_example` turns a record read with the image left encoded into the pipeline's common
layout (see `detr_jax.data.transforms`).
"""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def detection_features() -> tfds.features.FeaturesDict:
  """Feature dict of the detection builders (shapes, coco_folder)."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "image_id": np.int64,
      "objects": tfds.features.Sequence({
          "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
          "label": np.int64,
          "is_crowd": np.bool_,
          "area": np.float32,
      }),
  })


def decode_image(encoded):
  """Encoded bytes -> uint8 [h, w, 3] (grey and RGBA images converted to RGB)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def decode_example(raw):
  """Record of `detection_features` (image still encoded) -> the pipeline's common layout."""
  objects = raw["objects"]
  return {
      "image": decode_image(raw["image"]),
      "image_id": tf.cast(raw["image_id"], tf.int64),
      "boxes": tf.reshape(tf.cast(objects["bbox"], tf.float32), [-1, 4]),
      "labels": tf.cast(objects["label"], tf.int32),
      "is_crowd": tf.cast(objects["is_crowd"], tf.bool),
      "area": tf.cast(objects["area"], tf.float32),
  }


def has_training_boxes(raw):
  """True when a record holds at least one non-crowd box with positive width and height.

  Boxes are corner boxes, (x0, y0, x1, y1) or TFDS's (ymin, xmin, ymax, xmax): either way a box
  has positive size when coordinate 2 > 0 and 3 > 1.
  """
  boxes = tf.reshape(tf.cast(raw["objects"]["bbox"], tf.float32), [-1, 4])
  usable = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            & tf.logical_not(tf.cast(raw["objects"]["is_crowd"], tf.bool)))
  return tf.reduce_any(usable)
