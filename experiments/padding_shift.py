r"""How far evaluation padding moves DETR's outputs, and how many programs each padding compiles.

Runs a DETR one image at a time on images as the evaluation pipeline reads them (resize to
`dataset.eval_size`/`eval_max_size`), padded three ways:
  unpadded      the image's own size, no padding (`eval_padding="image"`, `eval_pad_multiple=1`):
                the official DETR evaluated at one image per GPU; the reference
  bucket        the smallest of `dataset.buckets` that holds it (`eval_padding="bucket"`, default)
  image-32      its size rounded up to 32, the backbone stride (`eval_padding="image"`)
and prints, for bucket and image-32 against unpadded: the largest and mean change of any query's
score, the largest change of a box corner (pixels of the original image), how many images' best
detection changed its label, and the mean IoU of the boxes of the queries scoring >= 0.5 unpadded;
then the number of distinct padded shapes (= compilations per batch size) each mode needs for
the images measured.

The model is `--checkpoint` (a training workdir or a `python -m detr_jax.convert` output) or,
without it, randomly initialised (which says how much padding moves the numbers of *a* network of
that architecture, not of a trained one). Images: `--images` (files, folders, globs) or the first
`--num` images of the config's eval split.

Command:
  PYTHONPATH=. python experiments/padding_shift.py --config configs/detr_r50_coco.py \
      --checkpoint /tmp/detr_r50 --num 50
"""

import argparse

import jax
import ml_collections
import numpy as np

from detr_jax import config_checks
from detr_jax import models
from detr_jax import parallel
from detr_jax import predict
from detr_jax import train

MODES = {"unpadded": dict(eval_padding="image", eval_pad_multiple=1),
         "bucket": dict(eval_padding="bucket"),
         "image-32": dict(eval_padding="image", eval_pad_multiple=32)}


def _eval_images(config, num):
  """The first `num` original images (uint8) of the config's eval split."""
  from detr_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.get_source(config.dataset)
  ds = source.builder.as_dataset(split=source.eval_split, shuffle_files=False,
                                 decoders=source.decoders)
  return [np.asarray(source.decode(raw)["image"]) for raw in ds.take(num)]


def _iou(a, b):
  lt = np.maximum(a[:, :2], b[:, :2])
  rb = np.minimum(a[:, 2:], b[:, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), -1)
  area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), -1)
  return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/detr_r50_coco.py")
  parser.add_argument("--checkpoint", default="", help="workdir or converted dir (default: "
                                                      "random initialisation)")
  parser.add_argument("--images", nargs="*", default=[], help="image files, folders or globs")
  parser.add_argument("--num", type=int, default=20, help="eval-split images, without --images")
  parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                      help="config overrides, e.g. dataset.eval_size=400")
  args = parser.parse_args()

  config = config_checks.load_config(args.config)
  config_checks.apply_overrides(config, args.set)
  if args.images:
    files, _ = predict.find_images(args.images)
    images = [predict.read_image(f) for f in files]
  else:
    images = _eval_images(config, args.num)
  if config.model.num_classes <= 0:
    config.model.num_classes = max(predict.class_names_for(config)) + 1
  class_names = {i: str(i) for i in range(config.model.num_classes)}
  if args.checkpoint:
    from detr_jax import checkpointing  # pylint: disable=g-import-not-at-top
    variables, what = checkpointing.load_variables(args.checkpoint), args.checkpoint
  else:
    model = models.build_model(config.model)
    variables, what = train.init_variables(config, model, jax.random.PRNGKey(0)), "random init"
  mesh = parallel.create_mesh(jax.devices()[:1])

  results, shapes = {}, {}
  for mode, fields in MODES.items():
    mode_config = ml_collections.ConfigDict(config.to_dict())
    mode_config.dataset.update(fields)
    detector = predict.Detector(mode_config, variables, class_names, mesh=mesh, batch_size=1)
    prepared = [detector.prepare(i) for i in images]
    shapes[mode] = len({p.bucket for p in prepared})
    results[mode] = [detector.run([p])[0] for p in prepared]  # one image per call
  print(f"{config.model.backbone}{' DC5' if config.model.get('dilation') else ''}, {what}, "
        f"{len(images)} images, eval_size {config.dataset.eval_size}, eval_max_size "
        f"{config.dataset.eval_max_size}")
  print("| padding | max |d score| | mean |d score| | max |d box| px | best label changed | "
        "IoU of confident boxes | padded shapes |")
  print("|---|---|---|---|---|---|---|")
  reference = results["unpadded"]
  for mode in MODES:
    d_score = np.concatenate([np.abs(r.scores - u.scores) for r, u in zip(results[mode],
                                                                          reference)])
    d_box = max(float(np.abs(r.boxes - u.boxes).max()) for r, u in zip(results[mode], reference))
    changed = sum(int(r.labels[np.argmax(r.scores)] != u.labels[np.argmax(u.scores)])
                  for r, u in zip(results[mode], reference))
    ious = np.concatenate([_iou(r.boxes[u.scores >= 0.5], u.boxes[u.scores >= 0.5])
                           for r, u in zip(results[mode], reference)])
    iou = f"{ious.mean():.4f} ({len(ious)} boxes)" if len(ious) else "no box scores >= 0.5"
    print(f"| {mode} | {d_score.max():.2e} | {d_score.mean():.2e} | {d_box:.3g} | "
          f"{changed}/{len(images)} | {iou} | {shapes[mode]} |")


if __name__ == "__main__":
  main()
