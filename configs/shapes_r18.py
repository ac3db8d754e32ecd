r"""The shapes demo with a standard ResNet-18: about 25 minutes on a CPU, exportable to PyTorch.

A small DETR trained from scratch on the synthetic shapes dataset with torchvision's ResNet-18
(64-128-256-512 channels, 4 stages), 128 px images, 2 encoder + 3 decoder layers of width 128,
12 queries and the official loss. It was the main job (then `configs/shapes.py`) until the
6-minute recipe took that name; `configs/shapes.py` builds on it. Its backbone is the one
`python -m detr_jax.export` writes for transformers and the official code, so the README's
"Exporting to PyTorch" trains this config.

Reaches: COCO AP50 0.883 / AP 0.553 on the 500 shapes validation images after 2500 steps
(earlier measurement). Speed on a fresh clone, 2-core CPU, jax CPU, float32: 0.48-0.50 s per step
of 16 images (steps 100-300; the log's ETA said about 22 minutes of training in all); 0.60-0.66 s
(about 27 minutes) before the CPU train step stopped donating its state.
Hardware: any CPU (measured on 2 cores); a GPU runs it in a few minutes.
Data: the shapes TFDS builder (detr_jax/data/shapes.py) is generated on first use under
`dataset.data_dir` (no download; about a minute).

Command (trains, evaluates COCO AP, writes PNGs of predicted boxes to WORKDIR/visualizations and
predictions with decoder attention maps of 4 validation images to WORKDIR/predictions):
  python -m detr_jax.main --config configs/shapes_r18.py --workdir /tmp/detr_shapes_r18
Export it to transformers and to the official layout:
  python -m detr_jax.export --config configs/shapes_r18.py --checkpoint /tmp/detr_shapes_r18 \
      --format hf --output /tmp/detr_shapes_hf
  python -m detr_jax.export --config configs/shapes_r18.py --checkpoint /tmp/detr_shapes_r18 \
      --format official --output /tmp/detr_shapes.pth
"""

import os

from configs import detr_r50_coco


def get_config():
  """Returns the exportable shapes demo: ResNet-18, 128 px images, 2+3 layers of width 128."""
  config = detr_r50_coco.get_config()

  model = config.model
  model.backbone = "resnet18"
  model.train_backbone_from = "stem"  # no pretrained weights: train the whole backbone
  model.hidden_dim = 128
  model.num_heads = 8
  model.enc_layers = 2
  model.dec_layers = 3
  model.dim_feedforward = 512
  model.dropout = 0.0  # short schedule, unlimited synthetic data: no need to regularise
  model.num_queries = 12  # at most 6 objects per image
  model.num_classes = -1  # from the dataset (6)

  ds = config.dataset
  ds.name = "shapes"
  ds.data_dir = os.path.expanduser("~/tensorflow_datasets")
  ds.image_size = 128
  ds.num_train_examples = 8000
  ds.num_eval_examples = 500
  ds.max_objects = 6
  ds.augmentation = "fixed"  # resize to `scales` (here: identity) + horizontal flip
  ds.scales = (128,)
  ds.max_size = 128
  ds.eval_size = 128
  ds.eval_max_size = 128
  ds.buckets = ((128, 128),)
  ds.max_boxes = 8
  ds.shuffle_buffer = 2000

  opt = config.optimizer
  opt.lr = 3e-4
  opt.lr_backbone = 3e-4
  opt.schedule = "cosine"  # a fixed time budget: decay to 0 at num_train_steps
  opt.warmup_steps = 100
  opt.grad_accum_steps = 1

  # Small batches, many steps: at equal images per second, twice the updates of batch 32.
  config.batch_size = 16
  config.eval_batch_size = 50
  config.num_train_steps = 2500
  config.steps_per_epoch = config.dataset.num_train_examples // config.batch_size
  config.log_every_steps = 100
  config.eval_every_steps = 0  # evaluate once, at the end
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  config.num_visualizations = 8
  config.num_predictions = 4  # with attention maps, into WORKDIR/predictions
  return config
