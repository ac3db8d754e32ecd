r"""DETR-R50-DC5 on COCO 2017: the official recipe with the resnet50 backbone and DC5 (dilated last stage, stride 16).

Reproduces: COCO val2017 box AP 43.3 / AP50 63.1 (published PyTorch result, 0.083 s/img on a V100).
Hardware: as configs/detr_r50_coco.py (global batch 64; DC5 needs about 2x the memory and time).

Command:
  python -m detr_jax.main --config configs/detr_r50_dc5_coco.py --workdir DIR
"""

from configs import detr_r50_coco


def get_config():
  """Returns the official DETR-R50-DC5 COCO config."""
  config = detr_r50_coco.get_config()
  config.model.backbone = "resnet50"
  config.model.dilation = True
  return config
