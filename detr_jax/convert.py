r"""Converts published PyTorch DETR weights into detr_jax Flax variables.

Accepted state_dict layouts (detected automatically):
  * official facebookresearch/detr: bare, wrapped in {"model": ...}, or panoptic with a `detr.`
    prefix (the panoptic mask head is not part of detection and is dropped);
  * Hugging Face transformers DETR, as stored in the published `facebook/detr-resnet-*` files
    (timm/torchvision backbone names under `model.backbone.conv_encoder.model.`), with
    transformers' own ResNet (`embedder`, `encoder.stages.N.layers.M`), and in the names that
    transformers 5.x gives them on load (`model.backbone.model.`, `o_proj`, `mlp.fc1`).

Every tensor is checked against the parameter tree of `build_model(config.model)` (shapes
included), so a converted checkpoint is complete and has the shapes the model expects.

Command:
  python -m detr_jax.convert --input detr-r50-e632da11.pth \
      --config configs/detr_r50_coco.py --output /tmp/detr_r50_converted
"""

import json
import os
import re
from typing import Any, Mapping

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

Flat = dict[str, np.ndarray]  # "params/transformer/decoder_norm/scale" -> array

_BN = r"(?P<w>weight|bias|running_mean|running_var)"
_WB = r"(?P<w>weight|bias)"
# Submodule names of other layouts -> our names.
_RENAME = {
    "q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "out", "out_proj": "out",
    "multihead_attn": "cross_attn", "encoder_attn": "cross_attn", "fc1": "linear1",
    "fc2": "linear2", "row_embeddings": "row_embed", "column_embeddings": "col_embed",
}
# Leaf names per kind of torch module.
_LEAF = {
    "conv": {"weight": "kernel", "bias": "bias"},
    "linear": {"weight": "kernel", "bias": "bias"},
    "norm": {"weight": "scale", "bias": "bias"},
    "bn": {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"},
    "embed": {"weight": "embedding"},
}

# ResNet names relative to the backbone body: torchvision/timm names, then transformers' ResNet
# (0-based stages and convs, hence the groups `s0`, `k0`).
_BACKBONE_RULES = (
    (r"conv1\.(?P<w>weight)", "backbone/conv1", "conv"),
    (r"bn1\." + _BN, "backbone/bn1", "bn"),
    (r"layer(?P<s>\d)\.(?P<j>\d+)\.conv(?P<k>\d)\.(?P<w>weight)", "backbone/layer{s}_{j}/conv{k}",
     "conv"),
    (r"layer(?P<s>\d)\.(?P<j>\d+)\.bn(?P<k>\d)\." + _BN, "backbone/layer{s}_{j}/bn{k}", "bn"),
    (r"layer(?P<s>\d)\.(?P<j>\d+)\.downsample\.0\.(?P<w>weight)",
     "backbone/layer{s}_{j}/downsample_conv", "conv"),
    (r"layer(?P<s>\d)\.(?P<j>\d+)\.downsample\.1\." + _BN, "backbone/layer{s}_{j}/downsample_bn",
     "bn"),
    (r"embedder\.embedder\.convolution\.(?P<w>weight)", "backbone/conv1", "conv"),
    (r"embedder\.embedder\.normalization\." + _BN, "backbone/bn1", "bn"),
    (r"encoder\.stages\.(?P<s0>\d)\.layers\.(?P<j>\d+)\.layer\.(?P<k0>\d)\.convolution\."
     r"(?P<w>weight)", "backbone/layer{s}_{j}/conv{k}", "conv"),
    (r"encoder\.stages\.(?P<s0>\d)\.layers\.(?P<j>\d+)\.layer\.(?P<k0>\d)\.normalization\." + _BN,
     "backbone/layer{s}_{j}/bn{k}", "bn"),
    (r"encoder\.stages\.(?P<s0>\d)\.layers\.(?P<j>\d+)\.shortcut\.convolution\.(?P<w>weight)",
     "backbone/layer{s}_{j}/downsample_conv", "conv"),
    (r"encoder\.stages\.(?P<s0>\d)\.layers\.(?P<j>\d+)\.shortcut\.normalization\." + _BN,
     "backbone/layer{s}_{j}/downsample_bn", "bn"),
)
_OFFICIAL_BACKBONE_PREFIXES = ("backbone.0.body.",)
_HF_BACKBONE_PREFIXES = ("model.backbone.conv_encoder.model.", "model.backbone.model.")

_ENC = r"transformer\.encoder\.layers\.(?P<i>\d+)\."
_DEC = r"transformer\.decoder\.layers\.(?P<i>\d+)\."
_OFFICIAL_RULES = (
    (_ENC + r"(?P<a>self_attn)\.in_proj_" + _WB, "transformer/encoder_layer_{i}/{a}", "qkv"),
    (_ENC + r"(?P<a>self_attn)\.out_proj\." + _WB, "transformer/encoder_layer_{i}/{a}/out",
     "linear"),
    (_ENC + r"(?P<m>linear[12])\." + _WB, "transformer/encoder_layer_{i}/{m}", "linear"),
    (_ENC + r"(?P<m>norm[12])\." + _WB, "transformer/encoder_layer_{i}/{m}", "norm"),
    (r"transformer\.encoder\.norm\." + _WB, "transformer/encoder_norm", "norm"),
    (_DEC + r"(?P<a>self_attn|multihead_attn)\.in_proj_" + _WB,
     "transformer/decoder_layer_{i}/{a}", "qkv"),
    (_DEC + r"(?P<a>self_attn|multihead_attn)\.out_proj\." + _WB,
     "transformer/decoder_layer_{i}/{a}/out", "linear"),
    (_DEC + r"(?P<m>linear[12])\." + _WB, "transformer/decoder_layer_{i}/{m}", "linear"),
    (_DEC + r"(?P<m>norm[123])\." + _WB, "transformer/decoder_layer_{i}/{m}", "norm"),
    (r"transformer\.decoder\.norm\." + _WB, "transformer/decoder_norm", "norm"),
    (r"class_embed\." + _WB, "class_embed", "linear"),
    (r"bbox_embed\.layers\.(?P<l>\d)\." + _WB, "bbox_embed/layers_{l}", "linear"),
    (r"query_embed\.(?P<w>weight)", "query_embed", "embed"),
    (r"input_proj\." + _WB, "input_proj", "conv"),
    (r"backbone\.1\.(?P<m>row_embed|col_embed)\.(?P<w>weight)", "position_embedding/{m}", "embed"),
)

_HF_ENC = r"model\.encoder\.layers\.(?P<i>\d+)\."
_HF_DEC = r"model\.decoder\.layers\.(?P<i>\d+)\."
_HF_PROJ = r"(?P<p>[qkvo]_proj|out_proj)\."
_HF_RULES = (
    (_HF_ENC + r"self_attn\." + _HF_PROJ + _WB, "transformer/encoder_layer_{i}/self_attn/{p}",
     "linear"),
    (_HF_ENC + r"(?:mlp\.)?(?P<m>fc[12])\." + _WB, "transformer/encoder_layer_{i}/{m}", "linear"),
    (_HF_ENC + r"self_attn_layer_norm\." + _WB, "transformer/encoder_layer_{i}/norm1", "norm"),
    (_HF_ENC + r"final_layer_norm\." + _WB, "transformer/encoder_layer_{i}/norm2", "norm"),
    (_HF_DEC + r"(?P<a>self_attn|encoder_attn)\." + _HF_PROJ + _WB,
     "transformer/decoder_layer_{i}/{a}/{p}", "linear"),
    (_HF_DEC + r"(?:mlp\.)?(?P<m>fc[12])\." + _WB, "transformer/decoder_layer_{i}/{m}", "linear"),
    (_HF_DEC + r"self_attn_layer_norm\." + _WB, "transformer/decoder_layer_{i}/norm1", "norm"),
    (_HF_DEC + r"encoder_attn_layer_norm\." + _WB, "transformer/decoder_layer_{i}/norm2", "norm"),
    (_HF_DEC + r"final_layer_norm\." + _WB, "transformer/decoder_layer_{i}/norm3", "norm"),
    (r"model\.decoder\.layernorm\." + _WB, "transformer/decoder_norm", "norm"),
    (r"class_labels_classifier\." + _WB, "class_embed", "linear"),
    (r"bbox_predictor\.layers\.(?P<l>\d)\." + _WB, "bbox_embed/layers_{l}", "linear"),
    (r"model\.query_position_embeddings\.(?P<w>weight)", "query_embed", "embed"),
    (r"model\.input_projection\." + _WB, "input_proj", "conv"),
    (r"model\.(?:backbone\.)?position_embedding\.(?P<m>row_embeddings|column_embeddings)\."
     r"(?P<w>weight)", "position_embedding/{m}", "embed"),
)
# Panoptic checkpoints carry the mask head next to the detector.
_SEGMENTATION_PREFIXES = ("bbox_attention.", "mask_head.")


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # numpy has no bfloat16
    value = value.numpy()
  return np.asarray(value, dtype=np.float32)


def _apply_rule(match: re.Match, template: str, kind: str, value: np.ndarray) -> Flat:
  """Maps one matched torch tensor to one (or, for a fused in_proj, three) flat entries."""
  groups = {k: _RENAME.get(v, v) for k, v in match.groupdict().items() if k != "w"}
  for zero_based in ("s0", "k0"):  # transformers' ResNet counts stages and convs from 0
    if zero_based in groups:
      groups[zero_based[0]] = int(groups.pop(zero_based)) + 1
  field = match.group("w")
  collection = "batch_stats" if kind == "bn" else "params"
  path = f"{collection}/{template.format(**groups)}"
  if kind == "qkv":  # rows [q; k; v] of the fused projection
    parts = np.split(value, 3, axis=0)
    return {f"{path}/{name}/{'kernel' if field == 'weight' else 'bias'}":
            (part.T if field == "weight" else part) for name, part in
            zip(("query", "key", "value"), parts)}
  if kind == "conv" and field == "weight":
    value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  elif kind == "linear" and field == "weight":
    value = value.T  # [out, in] -> [in, out]
  return {f"{path}/{_LEAF[kind][field]}": value}


def _map_keys(state_dict: Mapping[str, np.ndarray], rules,
              backbone_prefixes) -> tuple[Flat, dict[str, str]]:
  """Applies `rules` (and the backbone rules under `backbone_prefixes`); ValueError on unknowns.

  Returns:
    (flat variables, flat path -> torch key it came from).
  """
  flat, sources, unknown = {}, {}, []
  for key, value in state_dict.items():
    for prefix in backbone_prefixes:
      if key.startswith(prefix):
        name, key_rules = key[len(prefix):], _BACKBONE_RULES
        break
    else:
      name, key_rules = key, rules
    for pattern, template, kind in key_rules:
      match = re.fullmatch(pattern, name)
      if match:
        entries = _apply_rule(match, template, kind, value)
        flat.update(entries)
        sources.update(dict.fromkeys(entries, key))
        break
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f"{len(unknown)} unknown keys in the state_dict (first: {unknown[:5]}); "
                     "expected an official DETR or Hugging Face DetrForObjectDetection state_dict.")
  return flat, sources


def _clean(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Unwraps {"model": ...}, strips a `detr.` prefix, drops num_batches_tracked and mask heads."""
  if "model" in state_dict and isinstance(state_dict["model"], Mapping):
    state_dict = state_dict["model"]
  keys = [k for k in state_dict if not k.endswith("num_batches_tracked")]
  if keys and all(k.startswith("detr.") or k.startswith(_SEGMENTATION_PREFIXES) for k in keys):
    keys_to_names = {k: k[len("detr."):] if k.startswith("detr.") else k for k in keys}
  else:
    keys_to_names = {k: k for k in keys}
  dropped = [k for k, n in keys_to_names.items() if n.startswith(_SEGMENTATION_PREFIXES)]
  if dropped:
    logging.info("Ignoring %d panoptic mask-head tensors (%s, ...): not part of detection.",
                 len(dropped), dropped[0])
  return {n: _to_numpy(state_dict[k]) for k, n in keys_to_names.items() if k not in dropped}


def detect_layout(state_dict: Mapping[str, Any]) -> str:
  """Returns "official" or "huggingface" for a cleaned state_dict; ValueError otherwise."""
  if any(k.startswith(("transformer.", "backbone.0.body.")) for k in state_dict):
    return "official"
  if any(k.startswith(("model.", "class_labels_classifier.")) for k in state_dict):
    return "huggingface"
  raise ValueError(f"Unrecognised state_dict (first keys: {list(state_dict)[:5]}); expected the "
                   "official DETR layout (transformer.*, backbone.0.body.*) or Hugging Face "
                   "DetrForObjectDetection (model.*, class_labels_classifier.*).")


def _expected_flat(model_config) -> Flat:
  """Shapes of the variables of `build_model(model_config)`, without allocating them."""
  from detr_jax.models import build_model  # pylint: disable=g-import-not-at-top

  model = build_model(model_config)
  images = jnp.zeros((1, 64, 64, 3), jnp.float32)
  mask = jnp.ones((1, 64, 64), bool)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, mask, train=False))
  return _flatten({k: v for k, v in shapes.items() if k in ("params", "batch_stats")})


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _unflatten(flat: Flat) -> dict[str, Any]:
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def _infer_backbone(flat: Flat) -> str | None:
  from detr_jax.models import resnet  # pylint: disable=g-import-not-at-top

  blocks = tuple(len({p.split("/")[2] for p in flat if p.startswith(f"params/backbone/layer{s}_")})
                 for s in range(1, 5))
  block_type = "bottleneck" if any("/conv3/" in p for p in flat) else "basic"
  for name, arch in resnet.RESNET_ARCHS.items():
    if arch == (block_type, blocks):
      return name
  return None


def _check_config(flat: Flat, model_config, backbone_only: bool = False) -> None:
  """ValueError naming the config fields that disagree with the checkpoint."""
  found = {}
  backbone = _infer_backbone(flat)
  if backbone is not None:  # else the tree comparison names the missing tensors
    found["backbone"] = backbone
  if not backbone_only:
    query_embed = flat.get("params/query_embed/embedding")
    class_bias = flat.get("params/class_embed/bias")
    linear1 = flat.get("params/transformer/encoder_layer_0/linear1/bias")
    if query_embed is not None:
      found["num_queries"], found["hidden_dim"] = query_embed.shape
    if class_bias is not None:
      found["num_classes"] = class_bias.shape[0] - 1
    if linear1 is not None:
      found["dim_feedforward"] = linear1.shape[0]
    for part in ("encoder", "decoder"):
      layers = {p.split("/")[2] for p in flat if p.startswith(f"params/transformer/{part}_layer_")}
      if layers:
        found[f"{part[:3]}_layers"] = len(layers)
    found["pre_norm"] = "params/transformer/encoder_norm/scale" in flat
    found["position_embedding"] = (
        "learned" if "params/position_embedding/row_embed/embedding" in flat else "sine")
  wrong = [f"--config.model.{field}={value} (config has {model_config.get(field)!r})"
           for field, value in found.items() if model_config.get(field) != value]
  if wrong:
    raise ValueError("The checkpoint does not match config.model; set " + ", ".join(wrong) + ".")


def _check_against_model(flat: Flat, sources: dict[str, str], expected: Flat) -> None:
  missing = sorted(set(expected) - set(flat))
  unknown = [f"{sources[p]} -> {p}" for p in sorted(set(flat) - set(expected))]
  wrong_shape = [f"{sources[p]} -> {p}: checkpoint {flat[p].shape}, model "
                 f"{tuple(expected[p].shape)}"
                 for p in sorted(set(flat) & set(expected))
                 if tuple(flat[p].shape) != tuple(expected[p].shape)]
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing (first: {missing[:5]})")
  if unknown:
    problems.append(f"{len(unknown)} not in the model (first: {unknown[:5]})")
  if wrong_shape:
    problems.append(f"{len(wrong_shape)} with wrong shapes (first: {wrong_shape[:5]})")
  if problems:
    raise ValueError("Converted checkpoint does not fit build_model(config.model): "
                     + "; ".join(problems) + ". Check config.model against the checkpoint.")


def from_torch_state_dict(state_dict: Mapping[str, Any], model_config) -> dict[str, Any]:
  """Converts an official or Hugging Face DETR state_dict into Flax variables.

  Args:
    state_dict: tensor name -> numpy array or torch.Tensor; may be wrapped as {"model": ...}.
    model_config: `config.model`; its fields must describe the checkpoint's architecture.

  Returns:
    {"params": ..., "batch_stats": ...} of float32 numpy arrays in the tree of
    `build_model(model_config)`.

  Raises:
    ValueError: unknown, missing or wrongly shaped tensors, or config fields that disagree with
      the checkpoint (the message names the fields to set).
  """
  cleaned = _clean(state_dict)
  layout = detect_layout(cleaned)
  if layout == "official":
    flat, sources = _map_keys(cleaned, _OFFICIAL_RULES, _OFFICIAL_BACKBONE_PREFIXES)
  else:
    flat, sources = _map_keys(cleaned, _HF_RULES, _HF_BACKBONE_PREFIXES)
  _check_config(flat, model_config)
  _check_against_model(flat, sources, _expected_flat(model_config))
  return _unflatten(flat)


def backbone_from_torchvision(state_dict: Mapping[str, Any], model_config) -> dict[str, Any]:
  """Converts a torchvision ResNet state_dict (ImageNet weights) into backbone variables.

  Args:
    state_dict: torchvision names (conv1.weight, bn1.*, layer1.0.conv1.weight, ...); fc.* is
      ignored. numpy arrays or torch tensors.
    model_config: `config.model`; `backbone` must name the same ResNet.

  Returns:
    {"params": {"backbone": ...}, "batch_stats": {"backbone": ...}} of float32 numpy arrays.
  """
  cleaned = {k: v for k, v in _clean(state_dict).items() if not k.startswith("fc.")}
  flat, sources = _map_keys(cleaned, (), ("",))
  _check_config(flat, model_config, backbone_only=True)
  expected = {p: s for p, s in _expected_flat(model_config).items()
              if p.startswith(("params/backbone/", "batch_stats/backbone/"))}
  _check_against_model(flat, sources, expected)
  return _unflatten(flat)


def save_variables(variables: Mapping[str, Any], directory: str) -> None:
  """Writes {"params", "batch_stats"} as an orbax checkpoint at `directory` (must not exist)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), jax.tree.map(np.asarray, tree))
  checkpointer.wait_until_finished()


def load_variables(directory: str) -> dict[str, Any]:
  """Reads a checkpoint written by `save_variables`: {"params", "batch_stats"} of numpy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(directory)
  if not os.path.isdir(path):
    raise ValueError(f"No converted checkpoint at {path}; write one with "
                     "`python -m detr_jax.convert --input FILE --config ... --output DIR`.")
  restored = ocp.StandardCheckpointer().restore(path)
  return jax.tree.map(np.asarray, dict(restored))


def read_state_dict(path: str, allow_pickle: bool = False) -> Mapping[str, Any]:
  """Reads a .pth/.pt/.bin (torch) or .safetensors file into name -> array."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  if not path.endswith((".pth", ".pt", ".bin")):
    raise ValueError(f"--input {path}: expected a .pth, .pt, .bin or .safetensors file.")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"Reading {path} needs PyTorch: pip install -e \".[convert]\" "
                      "(or convert the file to .safetensors).") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  except Exception as e:  # pickle.UnpicklingError; torch wraps it differently across versions
    if allow_pickle:
      raise
    raise ValueError(f"{path} holds more than tensors (e.g. training arguments). If you trust the "
                     "file, rerun with --allow_pickle.") from e


def convert_file(input_path: str, model_config, output: str, allow_pickle: bool = False) -> str:
  """Converts a PyTorch DETR weights file into an orbax checkpoint directory.

  Args:
    input_path: .pth/.pt/.bin (needs torch) or .safetensors file, official or Hugging Face layout.
    model_config: `config.model` describing the checkpoint's architecture.
    output: directory to create; it must not exist. `config.json` (the model config) is written
      beside the checkpoint.
    allow_pickle: torch.load with weights_only=False (trusted files only).

  Returns:
    The line the command prints: what was read and where it was written.
  """
  output = os.path.abspath(output)
  if os.path.exists(output):
    raise ValueError(f"--output {output} exists; choose a new directory.")
  state_dict = _clean(read_state_dict(input_path, allow_pickle))
  variables = from_torch_state_dict(state_dict, model_config)
  save_variables(variables, output)
  with open(os.path.join(output, "config.json"), "w") as f:
    f.write(json.dumps(model_config.to_dict(), indent=2, default=str))
  num_tensors = len(jax.tree.leaves(variables))
  return (f"Converted {input_path} ({detect_layout(state_dict)} layout, {len(state_dict)} torch "
          f"tensors) into {num_tensors} Flax arrays at {output}")


def _define_flags():
  """The command's flags; defined only when this module runs as the program, so that importing
  `detr_jax.convert` into another absl program (train, evaluate, a user's) defines none."""
  config_flags.DEFINE_config_file("config", None, "Config file (its .model is used).")
  flags.DEFINE_string("input", None, "PyTorch DETR weights: .pth, .pt, .bin, .safetensors.")
  flags.DEFINE_string("output", None, "Directory to write the orbax checkpoint to.")
  flags.DEFINE_bool("allow_pickle", False,
                    "torch.load with weights_only=False (trusted files only).")
  flags.mark_flags_as_required(["config", "input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  print(convert_file(FLAGS.input, FLAGS.config.model, FLAGS.output, FLAGS.allow_pickle))


if __name__ == "__main__":
  _define_flags()
  from detr_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
