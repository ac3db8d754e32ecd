r"""The shapes demo in about 6 minutes of training: a quarter-width ResNet-18, many cheap steps.

configs/shapes.py with `model.backbone_width = 16` (16-32-64-128 channels instead of 64-...-512,
about 1/16 of the convolution FLOPs, trained from scratch) and a cosine schedule fitted to 2650
steps of batch 16. On this 2-core CPU a step takes about 0.13 s instead of 0.6 s, and time to
accuracy is bound by the number of steps: in the same 6 minutes the standard-width backbone
makes about 600 steps and stays on DETR's matching plateau (README, "Matching and loss").

Reaches: val (500 images) AP 0.379, AP50 0.738, AP75 0.357 after its 2650 steps, 5.55 minutes of
train-step time (warm working tree, this 2-core CPU, one seed, through experiments/convergence.py
--set model.backbone_width=16 num_train_steps=2650 optimizer.warmup_steps=50); not yet measured
on a fresh clone.
Not exportable to PyTorch (torchvision's ResNet has width 64): use configs/shapes.py for that.

Command:
  python -m detr_jax.main --config configs/shapes_fast.py --workdir /tmp/detr_shapes_fast
"""

from configs import shapes


def get_config():
  """Returns the 6-minute shapes config."""
  config = shapes.get_config()
  config.model.backbone_width = 16
  config.num_train_steps = 2650
  config.optimizer.warmup_steps = 50
  config.checkpoint_every_steps = 1000
  return config
