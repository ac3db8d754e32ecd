r"""Writes a synthetic COCO-format folder, the kind of small custom dataset people train DETR on.

Images of varied sizes (each side 320-640 px, JPEG), 1-6 objects each, 8-40 % of the short side,
of 4 categories with non-contiguous ids (2 circle, 5 square, 11 triangle, 17 star), drawn with the
shapes dataset's textured backgrounds and colours (`detr_jax/data/shapes.py`). Deterministic for a
seed. Layout, as `config.dataset.name = "coco_folder"` reads it:

  OUTPUT/train/*.jpg  OUTPUT/train.json  OUTPUT/val/*.jpg  OUTPUT/val.json

Command (about a minute for 2,000 + 200 images):
  PYTHONPATH=. python experiments/make_coco_folder.py --output /tmp/synthetic_coco
"""

import argparse
import json
import os

import numpy as np
from PIL import Image

from detr_jax.data import shapes

# COCO-style ids with gaps: category id -> (name, index into shapes.CLASS_NAMES for drawing).
CATEGORIES = {2: ("circle", 0), 5: ("square", 1), 11: ("triangle", 2), 17: ("star", 4)}
MIN_SIDE, MAX_SIDE = 320, 640
MIN_OBJECT, MAX_OBJECT = 0.08, 0.40  # fraction of the image's short side
MAX_OBJECTS = 6


def generate_image(seed, split_code, index):
  """(uint8 [h, w, 3] image, [(x, y, w, h, category id, pixel area)]) for one image."""
  rng = np.random.default_rng([seed, split_code, index])
  height, width = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
  canvas = shapes._background(rng, max(height, width))[:height, :width]  # pylint: disable=protected-access
  short = min(height, width)
  ids = sorted(CATEGORIES)
  placed, categories = [], []  # (x0, y0, x1, y1, shapes label), category id
  for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
    for _ in range(50):
      category = ids[int(rng.integers(0, len(ids)))]
      label = CATEGORIES[category][1]
      side = int(round(rng.uniform(MIN_OBJECT, MAX_OBJECT) * short))
      aspect = rng.uniform(0.8, 1.25) if label in (2, 4) else 1.0
      w = max(8, int(round(side * np.sqrt(aspect))))
      h = max(8, int(round(side / np.sqrt(aspect))))
      x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
      box = (x0, y0, x0 + w, y0 + h)
      iou, hidden = shapes._box_overlaps(box, [p[:4] for p in placed])  # pylint: disable=protected-access
      if iou <= 0.25 and hidden <= 0.35:
        placed.append(box + (label,))
        categories.append(category)
        break
  image, boxes, areas = shapes.draw_objects(canvas, placed, rng, [seed, split_code, index])
  return image, [(int(x0), int(y0), int(x1 - x0), int(y1 - y0), category, int(area))
                 for (x0, y0, x1, y1), category, area in zip(boxes, categories, areas)]


def write_split(output, name, count, seed, split_code):
  """Writes OUTPUT/NAME/*.jpg and OUTPUT/NAME.json; returns (json path, images dir)."""
  images_dir = os.path.join(output, name)
  os.makedirs(images_dir, exist_ok=True)
  images, annotations = [], []
  for index in range(count):
    pixels, objects = generate_image(seed, split_code, index)
    image_id = 1 + index
    file_name = f"{image_id:06d}.jpg"
    Image.fromarray(pixels).save(os.path.join(images_dir, file_name), quality=92)
    images.append({"id": image_id, "file_name": file_name, "height": pixels.shape[0],
                   "width": pixels.shape[1]})
    for x, y, w, h, category, area in objects:
      annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                          "category_id": category, "bbox": [x, y, w, h], "area": float(area),
                          "iscrowd": 0})
  categories = [{"id": c, "name": n} for c, (n, _) in sorted(CATEGORIES.items())]
  path = os.path.join(output, f"{name}.json")
  with open(path, "w") as f:
    json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
  return path, images_dir


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output", required=True)
  parser.add_argument("--train", type=int, default=2000, help="training images")
  parser.add_argument("--val", type=int, default=200, help="validation images")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  for name, count, code in (("train", args.train, 0), ("val", args.val, 1)):
    path, images_dir = write_split(args.output, name, count, args.seed, code)
    print(f"Wrote {count} images to {images_dir} and {path}")


if __name__ == "__main__":
  main()
