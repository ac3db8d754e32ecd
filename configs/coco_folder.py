r"""A small DETR trained from scratch on your own COCO-format folder: copy this file for your data.

Set the four paths (in a copy, or on the command line as below), then train. Class ids are the
JSON's category ids (gaps allowed; `num_classes` = max id + 1, from the data), class names come
from its "categories". The folder is prepared once as a TFDS dataset under `dataset.data_dir`.

Command, on the synthetic folder that `experiments/make_coco_folder.py` writes (2,000 train and
200 validation images of 320-640 px, 4 categories with ids 2, 5, 11, 17):
  PYTHONPATH=. python experiments/make_coco_folder.py --output /tmp/synthetic_coco
  python -m detr_jax.main --config configs/coco_folder.py --workdir /tmp/detr_folder \
    --config.dataset.annotations_file=/tmp/synthetic_coco/train.json \
    --config.dataset.images_dir=/tmp/synthetic_coco/train \
    --config.dataset.eval_annotations_file=/tmp/synthetic_coco/val.json \
    --config.dataset.eval_images_dir=/tmp/synthetic_coco/val \
    --config.dataset.data_dir=/tmp/synthetic_coco/tfds

Model: the shapes demo's small DETR (ResNet-18 trained from scratch with GroupNorm, 2 encoder and
3 decoder layers of width 128) on images resized to a 192 px short side, at most 256 px.
Time to accuracy on the synthetic folder: see "Time to accuracy" in the README
(`experiments/convergence.py --config configs/coco_folder.py`).
"""

from configs import shapes


def get_config():
  """Returns the custom-folder config: the shapes model at 192-256 px, data from a COCO folder."""
  config = shapes.get_config()

  model = config.model
  model.backbone_norm = "group_norm"  # trained from scratch: frozen BN at identity is no norm
  model.num_queries = 30
  model.num_classes = -1  # from the JSON's category ids

  ds = config.dataset
  ds.name = "coco_folder"
  ds.data_dir = ""  # where the prepared TFDS copy goes, e.g. next to your folder
  ds.annotations_file = ""  # instances JSON of the training images ...
  ds.images_dir = ""  # ... and their folder
  ds.eval_annotations_file = ""
  ds.eval_images_dir = ""
  for shapes_only in ("image_size", "num_train_examples", "num_eval_examples", "max_objects"):
    del ds[shapes_only]
  ds.augmentation = "fixed"  # resize to `scales` + horizontal flip
  ds.scales = (192,)
  ds.max_size = 256
  ds.eval_size = 192
  ds.eval_max_size = 256
  ds.buckets = ((192, 256), (256, 192), (256, 256))
  ds.max_boxes = 20
  ds.shuffle_buffer = 1000

  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_train_steps = 1200
  config.steps_per_epoch = -1  # from the number of training images
  config.optimizer.warmup_steps = 100
  config.checkpoint_every_steps = 400
  config.num_visualizations = 8
  config.num_predictions = 0
  return config
