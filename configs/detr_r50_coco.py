r"""DETR-R50 on COCO 2017: the official recipe (every value of the paper's 500-epoch schedule).

Reproduces: DETR R50, COCO val2017 box AP 42.0 / AP50 62.4 (published PyTorch result).
Hardware: the paper used 16 V100 (4 images each, global batch 64; 3 days per 300 epochs). On TPU
the same global batch runs data parallel over the mesh, one program per `dataset.buckets` shape;
compiled for TPU here (README, "Planning a TPU pod run"), the train step fits v5e-64 (1 image per
chip, 2.6 GiB of 16), v4-32 and v5p-32 (4 per chip, 8.3 GiB of 32 / 95) in float32, and the 500
epochs come to 3.4 h / 9.7 h / 5.8 h at an assumed 40% MFU.

Command:
  python -m detr_jax.main --config configs/detr_r50_coco.py --workdir gs://BUCKET/detr_r50 \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

Evaluate published weights (converted with `python -m detr_jax.convert`):
  python -m detr_jax.evaluate --config configs/detr_r50_coco.py --checkpoint DIR
"""

import ml_collections
from ml_collections import config_dict

COCO_EPOCH_IMAGES = 117_266  # train2017 images with at least one non-crowd box (official count)


def get_config() -> ml_collections.ConfigDict:
  """Returns the official DETR-R50 COCO config."""
  config = ml_collections.ConfigDict()
  config.seed = 42

  # --- Model (detr_jax.models.build_model) ---
  config.model = model = ml_collections.ConfigDict()
  model.backbone = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101
  model.dilation = False  # DC5: dilation instead of stride in the last stage
  # frozen_bn (official; the only one published weights load into) | group_norm (trained
  # GroupNorm: for a backbone trained from scratch)
  model.backbone_norm = "frozen_bn"
  model.group_norm_groups = 32  # group_norm only (Wu & He's 32); must divide backbone_width
  # Channels of the stem and layer1, doubled by each stage: 64 (torchvision, the only width
  # published weights load into and export writes); 32 is a 4x cheaper backbone from scratch.
  model.backbone_width = 64
  # 4 (torchvision's ResNet, stride 32) | 3: the backbone ends at layer3 (stride 16, a 4x finer
  # grid than stride 32 at less compute than DC5), for small images trained from scratch.
  model.backbone_stages = 4
  model.train_backbone_from = "layer2"  # stem and layer1 frozen as in the official recipe
  model.position_embedding = "sine"  # sine | learned
  model.hidden_dim = 256
  model.num_heads = 8
  model.enc_layers = 6
  model.dec_layers = 6
  model.dim_feedforward = 2048
  model.dropout = 0.1
  model.pre_norm = False
  model.num_queries = 100
  model.num_classes = 91  # max COCO id + 1; index num_classes is "no object"; <= 0: from the dataset
  model.aux_loss = True
  # Group DETR (Chen et al. 2022): K groups of num_queries queries in training, self-attention
  # within each group, one-to-one matching per group; inference uses group 0. 1: plain DETR.
  model.num_query_groups = 1
  # H-DETR's one-to-many branch: this many more queries in training, matched against the targets
  # repeated loss.one_to_many_k times; not used at inference. 0: off.
  model.one_to_many_queries = 0
  # Anchor DETR (Wang et al. 2022): each query is a learned anchor point (x, y); its sine
  # embedding through an MLP is the query's position and the box centre is predicted relative to
  # it. Converges faster from scratch; not the official model (no published weights): False.
  model.query_anchors = False
  # Iterative box refinement (Deformable DETR) with DAB-DETR's query positions: decoder layer
  # i > 0 corrects layer i - 1's box and takes its query position from that box's centre.
  # Needs query_anchors. False: off (official).
  model.box_refinement = False
  # DN-DETR (Li et al. 2022) on anchor points: this many groups of denoising queries in training,
  # one per target, at the target's centre moved by up to denoising_box_noise x half its size,
  # with its label embedded (flipped to a random class with probability denoising_label_noise);
  # each reconstructs its own target, no matching. Needs query_anchors. 0: off.
  model.denoising_groups = 0
  model.denoising_box_noise = 0.4
  model.denoising_label_noise = 0.2
  # The class head's initial bias: > 0 starts every sigmoid score near this probability (focal loss,
  # Lin et al. 2017; Deformable DETR uses 0.01 with loss.label_loss="sigmoid_focal"). 0: PyTorch's
  # default Linear init (official).
  model.class_prior_prob = 0.0
  model.dtype = "float32"  # compute dtype; "bfloat16" on TPU/GPU. Parameters stay float32.
  model.attention_implementation = None  # None (XLA) | "cudnn" (jax.nn.dot_product_attention)
  # 1x1 convolutions and the stem's max pooling: "auto" (a matmul and nine strided slices on CPU,
  # where XLA's gradients of both are slow, and kernels larger than their map as a matmul over
  # patches; XLA's own ops elsewhere) | "xla" | "dot". Same parameters and values either way.
  model.conv_implementation = "auto"
  # Kernels of the other convolutions, a compile option: "auto" ("eigen" on CPU: XLA's own
  # convolutions, whose gradients are faster there than YNNPACK's; XLA's defaults elsewhere) |
  # "eigen" | "xla_default". Only CPU programs change, by float32 round-off.
  model.conv_library = "auto"

  # --- Matching and set loss (detr_jax.matching, detr_jax.losses) ---
  config.loss = loss = ml_collections.ConfigDict()
  loss.matcher = "hungarian_host"  # hungarian_host (scipy callback) | hungarian_device | greedy
  loss.cost_class = 1.0
  loss.cost_bbox = 5.0
  loss.cost_giou = 2.0
  # w > 0 adds w * q / Q to query q's matching cost: a fixed priority between queries that
  # predict the same box (fewer duplicates on short schedules). 0: official.
  loss.cost_query_order = 0.0
  loss.class_cost_type = "softmax"  # matching class-cost term, see detr_jax.matching
  loss.label_loss = "softmax_ce"  # softmax_ce | sigmoid_focal | varifocal
  loss.eos_coef = 0.1
  loss.ce_loss_coef = 1.0
  loss.bbox_loss_coef = 5.0
  loss.giou_loss_coef = 2.0
  loss.focal_alpha = 0.25
  loss.focal_gamma = 2.0
  loss.varifocal_alpha = 0.75  # varifocal only (RT-DETR's value)
  loss.aux_loss = True
  loss.query_group_losses = "mean"  # Group DETR: mean | sum of the groups' losses
  loss.one_to_many_k = 6  # H-DETR: targets repeated k times for the one-to-many queries
  loss.one_to_many_weight = 1.0  # H-DETR: weight of the one-to-many branch's loss
  loss.denoising_weight = 1.0  # DN-DETR: weight of the denoising queries' loss

  # --- Data (detr_jax.data) ---
  config.dataset = ds = ml_collections.ConfigDict()
  ds.name = "coco"  # coco | coco_folder | shapes
  # TFDS data_dir (unset: ~/tensorflow_datasets); a gs:// path works on TPU.
  ds.data_dir = config_dict.placeholder(str)
  ds.train_split = "train"
  ds.eval_split = "validation"
  ds.annotations_file = ""  # coco_folder only: instances JSON ...
  ds.images_dir = ""  # ... and the folder of its images
  ds.eval_annotations_file = ""
  ds.eval_images_dir = ""
  ds.augmentation = "detr"  # detr (official multi-scale + crop) | fixed (resize only)
  ds.flip = True  # random horizontal flip (p 0.5) in both augmentations
  ds.scales = tuple(range(480, 801, 32))  # shorter side choices for training
  ds.max_size = 1333
  ds.crop_resize_scales = (400, 500, 600)
  ds.crop_min_size = 384
  ds.crop_max_size = 600
  ds.eval_size = 800
  ds.eval_max_size = 1333
  # Static shapes: every batch is padded to the smallest bucket (H, W) that holds it.
  ds.buckets = ((800, 1333), (1333, 800), (1088, 1088), (1333, 1333))
  # Evaluation pads each image on its own, so its detections do not depend on its batch:
  # "bucket", to its smallest bucket, or "image", to its size rounded up to eval_pad_multiple.
  ds.eval_padding = "bucket"
  ds.eval_pad_multiple = 32
  ds.max_boxes = 100  # targets padded to this many boxes (COCO max non-crowd is 93)
  ds.shuffle_buffer = 1000
  # Keep the decoded training images in memory (small datasets: height x width x 3 bytes each);
  # each epoch is then a uniform shuffle of them instead of file shuffling + shuffle_buffer.
  ds.cache_train = False
  # With cache_train, augmentation "fixed" and one scale: resize and normalise each cached image
  # once (float32, out_h x out_w x 12 bytes) and make batches in numpy, with other flips than
  # the tf.data path (detr_jax/data/input_pipeline.py). Cheaper input for small CPU runs.
  ds.cache_train_resized = False

  # --- Optimizer (detr_jax.optimizer) ---
  config.optimizer = opt = ml_collections.ConfigDict()
  opt.lr = 1e-4
  opt.lr_backbone = 1e-5
  opt.weight_decay = 1e-4
  opt.clip_norm = 0.1
  opt.b1 = 0.9  # AdamW's moment decays (torch's defaults, which the official code keeps)
  opt.b2 = 0.999
  opt.schedule = "step"  # step | cosine | linear (warmup, then linear decay to 0) | constant
  opt.warmup_steps = 0
  opt.lr_drop_epochs = 400
  opt.lr_drop_factor = 0.1
  opt.grad_accum_steps = 1

  # --- Training loop (detr_jax.train) ---
  config.batch_size = 64  # global batch over all devices and hosts
  config.num_epochs = 500
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.steps_per_epoch = COCO_EPOCH_IMAGES // config.batch_size
  config.eval_batch_size = 64
  config.log_every_steps = 100
  config.eval_every_steps = 20_000  # > 0: also at the end; 0: only at the end; < 0: never
  config.checkpoint_every_steps = 2_000
  config.keep_checkpoints = 3
  # A step whose loss or gradient is NaN or Inf skips its update (parameters and optimizer
  # state untouched); this many in a row stop training with an error (<= 0: never stop).
  config.max_nonfinite_steps = 20
  config.init_from = ""  # converted checkpoint dir (python -m detr_jax.convert) for fine-tuning
  config.num_visualizations = 0  # validation PNGs with predicted boxes written at the end
  config.visualization_threshold = 0.5  # lowest score drawn in those PNGs
  # Validation images run through `detr_jax.predict` (boxes and decoder attention maps) at the
  # end, into WORKDIR/predictions.
  config.num_predictions = 0
  config.backbone_init = ""  # torchvision ResNet .pth (ImageNet) for the backbone, when training from scratch
  return config
