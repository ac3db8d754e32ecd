r"""Run a trained or converted DETR on your own images.

Command (IMAGES: files, folders (their image files) or quoted globs):

  python -m detr_jax.predict --config configs/shapes.py --checkpoint /tmp/detr_shapes \
      --images photo.jpg photos/ "more/*.png" --output /tmp/predictions --attention

writes `OUT/predictions.json` (per image: file, width, height, image_id and the detections above
`--threshold` with class names), `OUT/detections_coco.json` (COCO results format with the
dataset's category ids: every query of every image, as `detr_jax.evaluate` scores them), one PNG
per image with the kept boxes, and with `--attention` one `*_attention.png` per image: for each
kept detection, where the last decoder layer's cross-attention looks (mean over heads), as the
official DETR notebook draws it. `--checkpoint` is a training workdir or a
`python -m detr_jax.convert` output.

Python:

  from detr_jax.predict import Detector
  detector = Detector.from_checkpoint("/tmp/detr_shapes", config)
  results = detector(["photo.jpg", pil_image, uint8_array], threshold=0.7)
  # per image: {"boxes": [N, 4] xyxy in original pixels, "scores", "labels", "names"}

Images are read as the evaluation pipeline reads them (EXIF orientation applied, any PIL mode
converted to RGB, the same resize to `dataset.eval_size`/`eval_max_size` and bucket fit, the same
normalisation and post-processing), each padded on its own (`dataset.eval_padding`: to its
bucket, or to its size rounded up to the stride) and batched with images of the same padded
shape: one compilation per padded shape, and detections that do not depend on the batch.
"""

import dataclasses
import glob
import json
import os
import sys
from typing import Any, Iterable, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageOps
from PIL import UnidentifiedImageError

from detr_jax import inference
from detr_jax import models
from detr_jax import parallel

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")
DEFAULT_THRESHOLD = 0.7


# ------------------------------------------------------------------ reading images
def find_images(patterns: Sequence[str]) -> tuple[list[str], list[str]]:
  """Expands files, folders (their image files, sorted) and globs.

  Returns:
    (paths in the order given, without repeats; one message per pattern that named nothing).
  """
  paths, problems = [], []
  for pattern in patterns:
    if os.path.isfile(pattern):
      found = [pattern]
    elif os.path.isdir(pattern):
      found = sorted(os.path.join(pattern, n) for n in os.listdir(pattern)
                     if n.lower().endswith(IMAGE_SUFFIXES))
      if not found:
        problems.append(f"{pattern}: a folder without image files ({', '.join(IMAGE_SUFFIXES)})")
    else:
      found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
      if not found:
        problems.append(f"{pattern}: no such file or folder, and no file matches it")
    for path in found:
      if path not in paths:
        paths.append(path)
  return paths, problems


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB (16-bit and float images scaled to 0..255, alpha on white)."""
  if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    values = np.asarray(image, np.float64)
    if image.mode == "F":
      top = max(float(values.max()), 1e-12)
    else:  # 16-bit data (PIL opens 16-bit PNGs as "I;16" or "I")
      top = 65535.0 if values.max() > 255 else 255.0
    image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, rgba)
  return image.convert("RGB")


def read_image(source: Any) -> np.ndarray:
  """A path, PIL image or array -> uint8 [H, W, 3] RGB, EXIF orientation applied.

  Raises:
    ValueError: an array that is not an image; OSError/UnidentifiedImageError for a file PIL
    cannot read.
  """
  if isinstance(source, np.ndarray):
    array = source
    if array.ndim == 2:
      array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or array.dtype != np.uint8:
      raise ValueError(f"An image array must be uint8 [H, W, 3] (or [H, W] / [H, W, 4]), got "
                       f"{array.dtype} {array.shape}.")
    return np.ascontiguousarray(array[..., :3])
  if isinstance(source, (str, os.PathLike)):
    with Image.open(source) as opened:
      opened.load()  # decode now: a truncated or corrupt file fails here, not later
      image = opened.copy()
      image.info.update(opened.info)
      exif = opened.getexif()
    if exif:
      image.info["exif"] = exif.tobytes()
  elif isinstance(source, Image.Image):
    image = source
  else:
    raise ValueError(f"Cannot read an image from {type(source).__name__}: give a path, a PIL "
                     "image or a uint8 array.")
  image = ImageOps.exif_transpose(image)
  array = np.asarray(to_rgb(image))
  if array.shape[0] < 1 or array.shape[1] < 1:
    raise ValueError(f"Empty image of size {array.shape[1]}x{array.shape[0]}.")
  return array


def preprocess(image: np.ndarray, ds_config) -> np.ndarray:
  """uint8 [H, W, 3] -> the normalised model input [h, w, 3] of the evaluation pipeline."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from detr_jax.data import transforms  # pylint: disable=g-import-not-at-top
  height, width = image.shape[:2]
  out_size = transforms.eval_geometry(tf.constant(height), tf.constant(width), ds_config)
  region = tf.constant([0.0, 0.0, float(height), float(width)])
  resized = transforms.resample(tf.constant(image), region, out_size, tf.constant(False))
  return transforms.normalize_image(resized).numpy()


# ------------------------------------------------------------------ checkpoint checks
# Parameter names -> the config.model field that sets their presence or shape.
_FIELD_OF = (
    ("class_embed", "model.num_classes"),
    ("query_embed", "model.num_queries"),
    ("encoder_layer_", "model.enc_layers"),
    ("decoder_layer_", "model.dec_layers"),
    ("encoder_norm", "model.pre_norm"),
    ("position_embedding", "model.position_embedding"),
    ("linear1", "model.dim_feedforward"),
    ("linear2", "model.dim_feedforward"),
    ("backbone", "model.backbone (or model.dilation)"),
    ("input_proj", "model.backbone (or model.hidden_dim)"),
    ("", "model.hidden_dim"),
)


def _field_for(path: str) -> str:
  for fragment, field in _FIELD_OF:
    if fragment in path:
      return field
  return "model"


def _flatten(tree, prefix="") -> dict[str, tuple]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, "items"):
      out.update(_flatten(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = tuple(np.shape(value))
  return out


def check_variables(variables: dict, config: ml_collections.ConfigDict, model) -> None:
  """Raises a ValueError naming the config field when `variables` do not fit `config.model`."""
  height, width = config.dataset.buckets[0]
  expected = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), np.zeros((1, height, width, 3), np.float32),
      np.ones((1, height, width), bool), train=False))
  # Training-only queries (Group DETR, H-DETR): inference neither reads nor needs them.
  training_only = lambda tree: {k: v for k, v in tree.items()
                                if k.split("/")[1] not in models.TRAINING_ONLY_PARAMS}
  got = training_only(_flatten({c: variables.get(c, {}) for c in ("params", "batch_stats")}))
  want = training_only(_flatten({c: expected.get(c, {}) for c in ("params", "batch_stats")}))
  num_classes = config.model.num_classes
  kernel = got.get("params/class_embed/kernel")
  if kernel is not None and kernel[-1] != num_classes + 1:
    raise ValueError(
        f"The checkpoint has {kernel[-1] - 1} classes (+ no-object) but config.model.num_classes="
        f"{num_classes}: set --config.model.num_classes={kernel[-1] - 1} (and the dataset whose "
        "class names go with it).")
  for path in sorted(set(got) | set(want)):
    if path not in got:
      raise ValueError(f"The checkpoint lacks {path}, which the config's model has: check "
                       f"config.{_field_for(path)}.")
    if path not in want:
      raise ValueError(f"The checkpoint has {path}, which the config's model lacks: check "
                       f"config.{_field_for(path)}.")
    if got[path] != want[path]:
      raise ValueError(f"{path} has shape {got[path]} in the checkpoint but {want[path]} in the "
                       f"config's model: check config.{_field_for(path)}.")


def class_names_for(config: ml_collections.ConfigDict) -> dict[int, str]:
  """{label: name} of the config's dataset, without reading the images where possible."""
  name = config.dataset.get("name", "coco")
  if name == "coco":
    from detr_jax.data import coco  # pylint: disable=g-import-not-at-top
    return coco.class_names()
  if name == "shapes":
    from detr_jax.data import shapes  # pylint: disable=g-import-not-at-top
    return dict(enumerate(shapes.CLASS_NAMES))
  from detr_jax.data import sources  # pylint: disable=g-import-not-at-top
  return dict(sources.get_source(config.dataset).class_names)


# ------------------------------------------------------------------ the detector
@dataclasses.dataclass
class Prepared:
  """One image ready for the model."""
  image: np.ndarray  # uint8 [H, W, 3], the original
  model_input: np.ndarray  # float32 [h, w, 3], normalised
  bucket: tuple[int, int]  # the padded (H, W) of model_input (config.dataset.eval_padding)


class Detector:
  """DETR on arbitrary images: `Detector.from_checkpoint(dir, config)(images)`.

  Attributes:
    config: the config (model.num_classes filled in).
    class_names: {label: name}.
    batch_size: most images per model call (default config.eval_batch_size).
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: dict,
               class_names: dict[int, str] | None = None, mesh=None,
               batch_size: int | None = None):
    from detr_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    config = ml_collections.ConfigDict(config.to_dict())
    self.class_names = dict(class_names if class_names is not None else class_names_for(config))
    if config.model.num_classes <= 0:
      config.model.num_classes = max(self.class_names) + 1
    self.config = config
    self.model = models.build_model(config.model)
    check_variables(variables, config, self.model)
    self.mesh = mesh if mesh is not None else parallel.create_mesh()
    self.buckets = input_pipeline.sorted_buckets(config.dataset)
    self.batch_size = int(batch_size or config.eval_batch_size)
    self.variables = jax.device_put(
        {c: variables.get(c, {}) for c in ("params", "batch_stats")},
        parallel.replicated(self.mesh))
    activation = inference.label_activation(config)
    self._predict = {False: inference.make_predict_fn(self.model, self.mesh, activation),
                     True: inference.make_predict_fn(self.model, self.mesh, activation,
                                                     attention=True)}

  @classmethod
  def from_checkpoint(cls, checkpoint: str, config: ml_collections.ConfigDict,
                      **kwargs) -> "Detector":
    """Loads a training workdir (latest checkpoint) or a `python -m detr_jax.convert` output."""
    from detr_jax import checkpointing  # pylint: disable=g-import-not-at-top
    return cls(config, checkpointing.load_variables(checkpoint), **kwargs)

  def compilations(self) -> int:
    """How many programs have been compiled so far (one per bucket and batch size)."""
    return sum(fn._cache_size() for fn in self._predict.values())  # pylint: disable=protected-access

  def prepare(self, source: Any) -> Prepared:
    image = read_image(source)
    model_input = preprocess(image, self.config.dataset)
    from detr_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    return Prepared(image, model_input,
                    input_pipeline.eval_padded_size(*model_input.shape[:2], self.config.dataset))

  def __call__(self, images: Iterable[Any], threshold: float = DEFAULT_THRESHOLD,
               attention: bool = False) -> list[dict[str, Any]]:
    """Detects objects in each image (paths, PIL images or uint8 arrays).

    Returns:
      Per image: {"boxes": float32 [N, 4] xyxy in pixels of the original image, "scores" [N],
      "labels" [N] (dataset label ids), "names" [N]}, the detections scoring at least `threshold`,
      best first; with `attention`, also "attention": float32 [N, H, W], the last decoder layer's
      cross-attention of each kept detection (mean over heads) upsampled to the image.
    """
    return [r.kept(threshold) for r in self.run([self.prepare(i) for i in images], attention)]

  def run(self, prepared: Sequence[Prepared], attention: bool = False) -> list["Result"]:
    """All queries of each prepared image (no threshold), in batches of one padded shape each
    (`input_pipeline.eval_padded_size`: an image's padding does not depend on the others)."""
    n = self.mesh.devices.size
    # One batch size per call (so one compilation per bucket): no larger than needed.
    batch = min(self.batch_size, -(-len(prepared) // n) * n)
    batch = max(-(-batch // n) * n, n)
    results: list[Result | None] = [None] * len(prepared)
    for bucket in sorted({p.bucket for p in prepared}):
      indices = [i for i, p in enumerate(prepared) if p.bucket == bucket]
      for start in range(0, len(indices), batch):
        chunk = indices[start:start + batch]
        images = np.zeros((batch, *bucket, 3), np.float32)
        mask = np.zeros((batch, *bucket), bool)
        orig = np.ones((batch, 2), np.int32)
        for row, i in enumerate(chunk):
          h, w = prepared[i].model_input.shape[:2]
          images[row, :h, :w] = prepared[i].model_input
          mask[row, :h, :w] = True
          orig[row] = prepared[i].image.shape[:2]
        inputs = parallel.global_batch((images, mask, orig), self.mesh)
        outs = [parallel.to_host(o, self.mesh)
                for o in self._predict[attention](self.variables, *inputs)]
        for row, i in enumerate(chunk):
          maps = None
          if attention:
            cells = outs[4][row]
            rows, cols = int(cells.any(axis=1).sum()), int(cells.any(axis=0).sum())
            maps = outs[3][row][:, :rows, :cols]  # [Q, rows, cols]: the unpadded image's cells
          results[i] = Result(outs[0][row], outs[1][row], outs[2][row], maps,
                              prepared[i].image.shape[:2], self.class_names)
    return results


@dataclasses.dataclass
class Result:
  """Every query's detection for one image."""
  scores: np.ndarray  # [Q]
  labels: np.ndarray  # [Q]
  boxes: np.ndarray  # [Q, 4] xyxy in original pixels
  attention: np.ndarray | None  # [Q, rows, cols] on the feature grid of the unpadded image
  size: tuple[int, int]  # (height, width) of the original image
  class_names: dict[int, str]

  def kept(self, threshold: float) -> dict[str, Any]:
    order = np.argsort(-self.scores, kind="stable")
    keep = order[self.scores[order] >= threshold]
    out = {"boxes": np.asarray(self.boxes[keep], np.float32),
           "scores": np.asarray(self.scores[keep], np.float32),
           "labels": np.asarray(self.labels[keep], np.int32),
           "names": [self.class_names.get(int(l), str(int(l))) for l in self.labels[keep]]}
    if self.attention is not None:
      height, width = self.size
      out["attention"] = np.stack([
          np.asarray(Image.fromarray(m.astype(np.float32), "F").resize((width, height),
                                                                        Image.BILINEAR))
          for m in self.attention[keep]]) if len(keep) else np.zeros((0, height, width),
                                                                      np.float32)
    return out


# ------------------------------------------------------------------ pictures
def draw_detections(image: np.ndarray, detections: dict[str, Any],
                    min_size: int = 256) -> Image.Image:
  """The image with its kept boxes, names and scores (small images enlarged to `min_size`)."""
  from detr_jax import visualize  # pylint: disable=g-import-not-at-top
  height, width = image.shape[:2]
  zoom = max(1.0, min_size / min(height, width))
  picture = Image.fromarray(image)
  if zoom > 1:
    picture = picture.resize((round(width * zoom), round(height * zoom)), Image.NEAREST)
  visualize.draw_boxes(picture, np.asarray(detections["boxes"]) * zoom, detections["scores"],
                       detections["labels"], detections["names"])
  return picture


def draw_attention(image: np.ndarray, detections: dict[str, Any], path: str,
                   max_panels: int = 8) -> None:
  """One column per kept detection: its attention map above, its box on the image below.

  As the official DETR notebook (detr_attention.ipynb) shows the decoder's cross-attention.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  count = min(len(detections["scores"]), max_panels)
  columns = max(count, 1)
  fig, axes = plt.subplots(2, columns, figsize=(3.2 * columns, 6.4), squeeze=False)
  for axis in axes.ravel():
    axis.axis("off")
  if not count:
    axes[1, 0].imshow(image)
    axes[0, 0].set_title("no detection above the threshold")
  for k in range(count):
    x0, y0, x1, y1 = detections["boxes"][k]
    title = f"{detections['names'][k]} {detections['scores'][k]:.2f}"
    axes[0, k].imshow(detections["attention"][k], cmap="viridis")
    axes[0, k].set_title(title)
    axes[1, k].imshow(image)
    axes[1, k].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red",
                                       linewidth=2))
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


# ------------------------------------------------------------------ the command
def _image_ids(paths: Sequence[str]) -> list[int]:
  """COCO image ids: the file names' numbers when all are distinct numbers (COCO's own file
  names, 000000397133.jpg), else 1..N in the order given."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
    return [int(s) for s in stems]
  return list(range(1, len(paths) + 1))


def predict_files(detector: Detector, patterns: Sequence[str], output: str,
                  threshold: float = DEFAULT_THRESHOLD, attention: bool = False) -> dict:
  """The command's work: reads, predicts, writes. Returns {"written": n, "skipped": [...]}.

  Raises:
    ValueError: no readable image among `patterns`.
  """
  paths, problems = find_images(patterns)
  skipped = list(problems)
  for problem in problems:
    print(f"Skipped {problem}", file=sys.stderr)
  prepared, kept_paths = [], []
  for path in paths:
    try:
      prepared.append(detector.prepare(path))
      kept_paths.append(path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
      message = f"{path}: not a readable image ({type(e).__name__}: {e})"
      skipped.append(message)
      print(f"Skipped {message}", file=sys.stderr)
  if not prepared:
    raise ValueError(f"No readable image in {list(patterns)}" +
                     (f" ({len(skipped)} skipped, see above)." if skipped else "."))
  stems = [os.path.splitext(os.path.basename(p))[0] for p in kept_paths]
  image_ids = _image_ids(kept_paths)
  # Two files of the same name from different folders get their image id appended.
  pictures = [s if stems.count(s) == 1 else f"{s}_{i}" for s, i in zip(stems, image_ids)]
  written = write_outputs(detector, prepared, kept_paths, image_ids, pictures, output, threshold,
                          attention, skipped)
  return {"written": written, "skipped": skipped, "compilations": detector.compilations()}


def write_outputs(detector: Detector, prepared: Sequence[Prepared], files: Sequence[str],
                  image_ids: Sequence[int], pictures: Sequence[str], output: str,
                  threshold: float, attention: bool, skipped: Sequence[str] = ()) -> int:
  """Runs the detector and writes predictions.json, detections_coco.json and the PNGs.

  Only the first process writes (every process must call it: the model runs on all devices).
  Returns the number of images.
  """
  results = detector.run(prepared, attention=attention)
  if jax.process_index() != 0:
    return len(results)
  os.makedirs(output, exist_ok=True)
  summary, coco_results = [], []
  for file, image_id, picture, item, result in zip(files, image_ids, pictures, prepared, results):
    height, width = item.image.shape[:2]
    kept = result.kept(threshold)
    draw_detections(item.image, kept).save(os.path.join(output, f"{picture}.png"))
    if attention:
      draw_attention(item.image, kept, os.path.join(output, f"{picture}_attention.png"))
    summary.append({
        "file": file, "image_id": image_id, "width": width, "height": height,
        "picture": f"{picture}.png",
        "detections": [{"box": [float(v) for v in box], "score": float(score),
                        "label": int(label), "name": name}
                       for box, score, label, name in zip(kept["boxes"], kept["scores"],
                                                          kept["labels"], kept["names"])]})
    for score, label, (x0, y0, x1, y1) in zip(result.scores, result.labels, result.boxes):
      coco_results.append({"image_id": image_id, "category_id": int(label),
                           "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                           "score": float(score)})
  with open(os.path.join(output, "predictions.json"), "w") as f:
    json.dump({"threshold": threshold, "images": summary, "skipped": list(skipped)}, f, indent=1)
  with open(os.path.join(output, "detections_coco.json"), "w") as f:
    json.dump(coco_results, f)
  return len(results)


def predict_validation_images(config: ml_collections.ConfigDict, variables: dict, mesh,
                              class_names: dict[int, str], output: str, num_images: int,
                              threshold: float | None = None, attention: bool = True) -> int:
  """The main job's last act: predict (with attention maps) on the first validation images.

  Reads the original images of `config.dataset`'s eval split and writes as the predict command
  does, pictures named `image_<id>`. Returns the number of images.
  """
  from detr_jax.data import sources  # pylint: disable=g-import-not-at-top
  threshold = config.get("visualization_threshold", 0.5) if threshold is None else threshold
  source = sources.get_source(config.dataset)
  records = source.builder.as_dataset(split=source.eval_split, decoders=source.decoders,
                                      shuffle_files=False).take(num_images)
  detector = Detector(config, variables, class_names, mesh=mesh)
  prepared, ids = [], []
  for raw in records:
    example = source.decode(raw)
    prepared.append(detector.prepare(np.asarray(example["image"])))
    ids.append(int(example["image_id"]))
  if not prepared:
    return 0
  return write_outputs(detector, prepared, [f"{source.eval_split}/{i}" for i in ids], ids,
                       [f"image_{i}" for i in ids], output, threshold, attention)


def _define_flags():
  """The command's flags; defined only when this module runs as the program."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                  lock_config=False)
  flags.DEFINE_string("checkpoint", None, "Training workdir or `python -m detr_jax.convert` "
                      "output.")
  flags.DEFINE_multi_string("images", None, "Image files, folders or globs (several may follow "
                            "one --images).")
  flags.DEFINE_string("output", None, "Folder for predictions.json, detections_coco.json and "
                      "the PNGs.")
  flags.DEFINE_float("threshold", DEFAULT_THRESHOLD, "Lowest score kept in predictions.json and "
                     "drawn.")
  flags.DEFINE_bool("attention", False, "Also draw each kept detection's decoder "
                    "cross-attention.")
  flags.mark_flags_as_required(["config", "checkpoint", "images", "output"])


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  # `--images a.jpg b.jpg dir/`: absl leaves the values after the first one in argv.
  patterns = list(FLAGS.images) + list(argv[1:])
  if not 0.0 <= FLAGS.threshold <= 1.0:
    raise ValueError(f"--threshold must be in [0, 1], got {FLAGS.threshold}.")
  detector = Detector.from_checkpoint(FLAGS.checkpoint, FLAGS.config)
  try:
    report = predict_files(detector, patterns, FLAGS.output, FLAGS.threshold, FLAGS.attention)
  except ValueError as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"Predicted {report['written']} images into {FLAGS.output} "
        f"({len(report['skipped'])} skipped, {report['compilations']} compilations).")


if __name__ == "__main__":
  _define_flags()
  from detr_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
