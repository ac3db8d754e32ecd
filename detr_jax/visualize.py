"""PNG pictures of predicted boxes (and ground truth) on validation images."""

import os

from absl import logging
import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw

from detr_jax import evaluate
from detr_jax.data import transforms

# Undoes the input pipeline's normalisation.
_MEAN = np.array(transforms.IMAGENET_MEAN, np.float32)
_STD = np.array(transforms.IMAGENET_STD, np.float32)
_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
           "#bfef45", "#469990", "#9a6324")


def draw_predictions(image: np.ndarray, pixel_mask: np.ndarray, orig_size, scores, labels,
                     boxes, class_names: dict[int, str], gt_boxes=None, threshold: float = 0.5,
                     min_size: int = 256) -> Image.Image:
  """Draws detections above `threshold` (coloured, labelled) and ground truth (white).

  Args:
    image: [H, W, 3] normalised image as fed to the model (possibly padded).
    pixel_mask: [H, W] True on real pixels.
    orig_size: (height, width) of the original image; boxes are in its pixels.
    scores: [queries]; labels: [queries]; boxes: [queries, 4] xyxy in original pixels.
    class_names: {label: name}.
    gt_boxes: optional [n, 4] xywh in original pixels.
    threshold: minimum score of a drawn detection.
    min_size: the shorter side is upscaled to at least this many pixels for legibility.

  Returns:
    A PIL image of the unpadded input.
  """
  height = int(np.asarray(pixel_mask).any(axis=1).sum())
  width = int(np.asarray(pixel_mask).any(axis=0).sum())
  pixels = np.clip((np.asarray(image)[:height, :width] * _STD + _MEAN) * 255, 0, 255)
  zoom = max(1.0, min_size / max(min(height, width), 1))
  picture = Image.fromarray(pixels.astype(np.uint8)).resize(
      (round(width * zoom), round(height * zoom)), Image.NEAREST)
  draw = ImageDraw.Draw(picture)
  # Original pixels -> displayed pixels.
  scale = np.array([width / orig_size[1], height / orig_size[0]] * 2) * zoom
  if gt_boxes is not None:
    for x, y, w, h in np.asarray(gt_boxes, np.float64):
      x0, y0, x1, y1 = np.array([x, y, x + w, y + h]) * scale
      draw.rectangle([x0, y0, x1, y1], outline="white", width=1)
  keep = [i for i, score in enumerate(scores) if score >= threshold]
  draw_boxes(picture, np.asarray(boxes, np.float64)[keep] * scale,
             np.asarray(scores)[keep], np.asarray(labels)[keep],
             [class_names.get(int(labels[i]), str(labels[i])) for i in keep])
  return picture


def draw_boxes(picture: Image.Image, boxes, scores, labels, names) -> Image.Image:
  """Draws xyxy `boxes` (in the picture's pixels) with "name score" captions, best on top."""
  draw = ImageDraw.Draw(picture)
  for score, label, box, name in sorted(zip(scores, labels, boxes, names), key=lambda t: t[0]):
    color = _COLORS[int(label) % len(_COLORS)]
    x0, y0, x1, y1 = (float(v) for v in box)
    draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
    caption = f"{name} {float(score):.2f}"
    # A filled label background keeps the caption readable on any object colour.
    draw.rectangle(draw.textbbox((x0 + 2, y0 + 1), caption), fill=color)
    draw.text((x0 + 2, y0 + 1), caption, fill="white")
  return picture


def write_predictions(config, model, variables, mesh, class_names: dict[int, str], out_dir: str,
                      num_images: int, threshold: float | None = None) -> list[str]:
  """Runs the model on the first `num_images` validation images and writes one PNG each.

  Returns:
    The written paths (only process 0 writes; other processes return []).
  """
  threshold = config.get("visualization_threshold", 0.5) if threshold is None else threshold
  paths = []
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
  for local, (scores, labels, boxes) in evaluate.predict_batches(config, model, variables, mesh):
    for i in np.flatnonzero(local["example_valid"]):
      if len(paths) >= num_images:
        break
      gt = local["gt_boxes"][i][np.asarray(local["gt_valid"][i], bool)]
      picture = draw_predictions(local["images"][i], local["pixel_mask"][i],
                                 local["orig_size"][i], scores[i], labels[i], boxes[i],
                                 class_names, gt_boxes=gt, threshold=threshold)
      path = os.path.join(out_dir, f"image_{int(local['image_id'][i])}.png")
      if jax.process_index() == 0:
        picture.save(path)
      paths.append(path)
    if len(paths) >= num_images:
      break
  logging.info("Wrote %d prediction pictures to %s.", len(paths), out_dir)
  return paths if jax.process_index() == 0 else []
