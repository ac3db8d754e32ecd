r"""The shapes demo in about 6 minutes of training: a quarter-width ResNet-18, many cheap steps.

configs/shapes.py with `model.backbone_width = 16` (16-32-64-128 channels instead of 64-...-512,
about 1/16 of the convolution FLOPs, trained from scratch), the decoded training images kept in
memory (`dataset.cache_train`, 375 MB) and a cosine schedule fitted to 3000 steps of batch 16. On
this 2-core CPU a step takes about 0.11 s instead of 0.6 s, and time to accuracy is bound by the
number of steps: in the same 6 minutes the standard-width backbone makes about 600 steps and
stays on DETR's matching plateau (README, "Matching and loss").

Reaches (val, 500 images, after its 3000 steps; warm working tree, this 2-core CPU, the command
below with --config.seed=S): seed 0 AP 0.329, AP50 0.691 in 5.5 minutes of training; seed 1 AP
0.406, AP50 0.769 in 6.2 minutes. Runs of one recipe scatter this much; the 2650-step recipe
without the cache gave AP 0.303 and 0.275 for the same seeds in 5.3 and 5.6 minutes. On a fresh
clone (README install, then the command below as it is): 3000 steps in 6.0 minutes, AP 0.329,
AP50 0.691, AP75 0.277, the same numbers as the warm tree's seed 0.
Those runs included waits of 17-29 s at some epoch boundaries, since fixed (README, "Epoch
boundaries stalled the loop"): rerun without them, the same AP 0.329 in 6.6 minutes (warm tree)
and 6.1 minutes (fresh clone, the command below as it is), on a day when every 100 steps took
11-14 s instead of about 9.
Not exportable to PyTorch (torchvision's ResNet has width 64): use configs/shapes.py for that.

Command:
  python -m detr_jax.main --config configs/shapes_fast.py --workdir /tmp/detr_shapes_fast
"""

from configs import shapes


def get_config():
  """Returns the 6-minute shapes config."""
  config = shapes.get_config()
  config.model.backbone_width = 16
  config.dataset.cache_train = True
  config.num_train_steps = 3000
  config.optimizer.warmup_steps = 50
  config.checkpoint_every_steps = 1000
  return config
