r"""A tiny DETR on the synthetic shapes dataset, for unit tests and smoke runs (seconds on a CPU).

Reproduces nothing: it exercises every code path (backbone, encoder, decoder, aux losses, host
matching, input pipeline, checkpointing) with tiny shapes.

Command:
  python -m detr_jax.main --config configs/tiny_test.py --workdir /tmp/detr_tiny
"""

from configs import detr_r50_coco


def get_config():
  """Returns a tiny config: ResNet-18 at width 256/8, 2+2 layers, 10 queries, 64x64 images."""
  config = detr_r50_coco.get_config()
  model = config.model
  model.backbone = "resnet18"
  model.train_backbone_from = "stem"  # train everything: there are no pretrained weights
  model.hidden_dim = 32
  model.num_heads = 4
  model.enc_layers = 2
  model.dec_layers = 2
  model.dim_feedforward = 64
  model.dropout = 0.0
  model.num_queries = 10
  model.num_classes = 6

  ds = config.dataset
  ds.name = "shapes"
  ds.augmentation = "fixed"
  ds.scales = (64,)
  ds.max_size = 64
  ds.eval_size = 64
  ds.eval_max_size = 64
  ds.buckets = ((64, 64),)
  ds.max_boxes = 8
  ds.shuffle_buffer = 64
  ds.num_train_examples = 64  # shapes only
  ds.num_eval_examples = 16
  ds.image_size = 64

  config.optimizer.lr = 1e-3
  config.optimizer.lr_backbone = 1e-3
  config.optimizer.schedule = "constant"
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_train_steps = 4
  config.steps_per_epoch = 8
  config.log_every_steps = 2
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 2
  return config
