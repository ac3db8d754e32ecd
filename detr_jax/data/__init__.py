"""Input pipeline of detr-jax: TFDS sources (coco, coco_folder, shapes), DETR augmentations,
static-shape batching. The public API is `detr_jax.data.input_pipeline`."""
