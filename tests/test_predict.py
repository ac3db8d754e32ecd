"""detr_jax.predict: reading any image, the evaluation resize, batching by bucket, attention maps,
checks of the checkpoint against the config."""

import io

import jax
import numpy as np
from PIL import Image
import pytest

from configs import tiny_test
from detr_jax import inference
from detr_jax import models
from detr_jax import parallel
from detr_jax import predict
from detr_jax.data import transforms


def _config(**model):
  config = tiny_test.get_config()
  config.model.num_classes = 6
  config.model.update(model)
  return config


def _variables(config, seed=0):
  model = models.build_model(config.model)
  variables = model.init(jax.random.PRNGKey(seed), np.zeros((1, 64, 64, 3), np.float32),
                         np.ones((1, 64, 64), bool), train=False)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


@pytest.fixture(scope="module")
def detector():
  config = _config()
  # Two buckets: landscape images go to the small one.
  config.dataset.buckets = [(32, 64), (64, 64)]
  return predict.Detector(config, _variables(config),
                          mesh=parallel.create_mesh(jax.devices()[:1]), batch_size=4)


# ------------------------------------------------------------------ reading images
def _saved(image: Image.Image, fmt: str, **kwargs) -> Image.Image:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  buffer.seek(0)
  return Image.open(buffer)


def test_any_mode_becomes_8_bit_rgb():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, (12, 20), dtype=np.uint8)
  cases = {
      "RGB": Image.fromarray(rgb),
      "L": Image.fromarray(gray),
      "P": Image.fromarray(rgb).convert("P"),
      "CMYK": Image.fromarray(rgb).convert("CMYK"),
      "1": Image.fromarray(gray).convert("1"),
      "I;16 png": _saved(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
      "RGBA": Image.fromarray(np.dstack([rgb, np.full((12, 20), 255, np.uint8)]), "RGBA"),
  }
  for name, image in cases.items():
    array = predict.read_image(image)
    assert array.dtype == np.uint8 and array.shape == (12, 20, 3), name
  # 16-bit data scaled, not clipped: 257 * v -> v.
  np.testing.assert_array_equal(predict.read_image(cases["I;16 png"])[..., 0], gray)
  np.testing.assert_array_equal(predict.read_image(cases["L"])[..., 1], gray)
  np.testing.assert_array_equal(predict.read_image(cases["RGBA"]), rgb)
  # Transparent pixels are drawn on white.
  clear = Image.fromarray(np.zeros((4, 4, 4), np.uint8), "RGBA")
  assert (predict.read_image(clear) == 255).all()
  # Arrays: gray and RGBA are accepted; anything else is a clear error.
  assert predict.read_image(gray).shape == (12, 20, 3)
  with pytest.raises(ValueError, match="uint8"):
    predict.read_image(rgb.astype(np.float32))


def test_exif_orientation_is_applied(tmp_path):
  rng = np.random.default_rng(1)
  stored = rng.integers(0, 256, (10, 30, 3), dtype=np.uint8)  # 30 wide, 10 high as stored
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  path = tmp_path / "rotated.png"
  Image.fromarray(stored).save(path, exif=exif.tobytes())
  shown = predict.read_image(str(path))
  assert shown.shape == (30, 10, 3)
  np.testing.assert_array_equal(shown, np.rot90(stored, k=-1))


def test_corrupt_file_raises_when_read(tmp_path):
  path = tmp_path / "truncated.png"
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, "PNG")
  path.write_bytes(buffer.getvalue()[:60])
  with pytest.raises((OSError, SyntaxError)):
    predict.read_image(str(path))


def test_preprocess_is_the_evaluation_resize_in_closed_form():
  """Halving with half-pixel bilinear sampling averages 2x2 blocks; then ImageNet normalisation."""
  config = _config()  # eval_size = eval_max_size = 64
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (128, 96, 3), dtype=np.uint8)
  out = predict.preprocess(image, config.dataset)
  # Short side 96 -> 64 (factor 1.5) but the long side is capped at 64: 64 x 48 (factor 2).
  assert out.shape == (64, 48, 3)
  blocks = image.astype(np.float64).reshape(64, 2, 48, 2, 3).mean(axis=(1, 3))
  expected = (blocks / 255.0 - np.array(transforms.IMAGENET_MEAN)) / np.array(
      transforms.IMAGENET_STD)
  np.testing.assert_allclose(out, expected, atol=1e-4)


# ------------------------------------------------------------------ the detector
def _images(rng, sizes):
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_detections_are_the_models_and_independent_of_the_batch(detector):
  rng = np.random.default_rng(3)
  images = _images(rng, [(40, 80), (64, 64), (30, 60), (50, 50), (20, 64), (64, 32)])
  alone = detector([images[0]], threshold=0.0)[0]
  together = detector(images, threshold=0.0)
  # Same padding whatever else is in the call; the programs for batch 1 and batch 4 differ only
  # in float round-off.
  np.testing.assert_array_equal(alone["labels"], together[0]["labels"])
  np.testing.assert_allclose(alone["scores"], together[0]["scores"], rtol=1e-5)
  np.testing.assert_allclose(alone["boxes"], together[0]["boxes"], rtol=1e-5, atol=1e-4)
  assert together[0]["names"] == [detector.class_names[int(l)] for l in together[0]["labels"]]
  # The same numbers as the model and post-processing applied by hand to the padded input.
  prepared = detector.prepare(images[0])
  assert prepared.bucket == (32, 64)
  h, w = prepared.model_input.shape[:2]
  padded = np.zeros((1, 32, 64, 3), np.float32)
  padded[0, :h, :w] = prepared.model_input
  mask = np.zeros((1, 32, 64), bool)
  mask[0, :h, :w] = True
  outputs = detector.model.apply(detector.variables, padded, mask)
  scores, labels, boxes = map(np.asarray, inference.postprocess(
      outputs["pred_logits"], outputs["pred_boxes"], np.array([[40, 80]])))
  order = np.argsort(-scores[0], kind="stable")
  np.testing.assert_allclose(alone["scores"], scores[0][order], rtol=1e-5)
  np.testing.assert_allclose(alone["boxes"], boxes[0][order], rtol=1e-4, atol=1e-3)
  # Boxes are in pixels of the original image.
  assert alone["boxes"][:, 2].max() > 10


def test_one_compilation_per_bucket():
  config = _config()
  config.dataset.buckets = [(32, 64), (64, 64)]
  fresh = predict.Detector(config, _variables(config), batch_size=8)  # 8 devices: 1 per device
  rng = np.random.default_rng(4)
  # 11 images in the small bucket, 9 in the large one: several batches each.
  images = _images(rng, [(30, 64)] * 11 + [(64, 60)] * 9)
  results = fresh(images, threshold=0.5)
  assert len(results) == 20
  assert fresh.compilations() == 2


def test_threshold_keeps_best_first(detector):
  rng = np.random.default_rng(5)
  (image,) = _images(rng, [(64, 64)])
  everything = detector([image], threshold=0.0)[0]
  assert len(everything["scores"]) == detector.config.model.num_queries
  assert (np.diff(everything["scores"]) <= 0).all()
  cut = float(np.median(everything["scores"]))
  kept = detector([image], threshold=cut)[0]
  assert len(kept["scores"]) == int((everything["scores"] >= cut).sum())
  assert (kept["scores"] >= cut).all()


def test_attention_maps_cover_the_unpadded_image(detector):
  rng = np.random.default_rng(6)
  (image,) = _images(rng, [(64, 30)])  # 64 x 30 in the 64 x 64 bucket: a padded column
  with_maps = detector([image], threshold=0.0, attention=True)[0]
  plain = detector([image], threshold=0.0)[0]
  # Asking for attention changes no detection.
  np.testing.assert_array_equal(with_maps["scores"], plain["scores"])
  np.testing.assert_array_equal(with_maps["boxes"], plain["boxes"])
  maps = with_maps["attention"]
  assert maps.shape == (len(plain["scores"]), 64, 30)  # upsampled to the original image
  # On the 2 x 2 feature grid the right column is padding: each query's weights over the
  # unpadded cells (mean of the heads' softmaxes, padding masked out) sum to one.
  (result,) = detector.run([detector.prepare(image)], attention=True)
  assert result.attention.shape[1:] == (2, 1)
  np.testing.assert_allclose(result.attention.sum(axis=(1, 2)), 1.0, rtol=1e-5)


# ------------------------------------------------------------------ checkpoint vs config
@pytest.mark.parametrize("field,value,named", [
    ("num_classes", 9, "model.num_classes=6"),
    ("dec_layers", 3, "model.dec_layers"),
    ("num_queries", 7, "model.num_queries"),
    ("backbone", "resnet34", "model.backbone"),
])
def test_checkpoint_that_disagrees_with_the_config_names_the_field(field, value, named):
  trained = _config()
  variables = _variables(trained)
  other = _config(**{field: value})
  with pytest.raises(ValueError, match=named.replace(".", r"\.")):
    predict.Detector(other, variables, mesh=parallel.create_mesh(jax.devices()[:1]))


def test_find_images_expands_folders_and_globs(tmp_path):
  for name in ("b.jpg", "a.png", "notes.txt"):
    (tmp_path / name).write_bytes(b"x")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "c.jpeg").write_bytes(b"x")
  paths, problems = predict.find_images(
      [str(tmp_path), str(tmp_path / "sub" / "*.jpeg"), str(tmp_path / "a.png"),
       str(tmp_path / "missing.jpg")])
  assert paths == [str(tmp_path / "a.png"), str(tmp_path / "b.jpg"),
                   str(tmp_path / "sub" / "c.jpeg")]
  assert len(problems) == 1 and "missing.jpg" in problems[0]
