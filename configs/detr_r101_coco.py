r"""DETR-R101 on COCO 2017: the official recipe with the resnet101 backbone.

Reproduces: COCO val2017 box AP 43.5 / AP50 63.8 (published PyTorch result, 0.050 s/img on a V100).
Hardware: as configs/detr_r50_coco.py (global batch 64).

Command:
  python -m detr_jax.main --config configs/detr_r101_coco.py --workdir DIR
"""

from configs import detr_r50_coco


def get_config():
  """Returns the official DETR-R101 COCO config."""
  config = detr_r50_coco.get_config()
  config.model.backbone = "resnet101"
  config.model.dilation = False
  return config
