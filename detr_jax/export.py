r"""Export detr_jax weights to PyTorch: a transformers folder or an official DETR `.pth`.

  python -m detr_jax.export --config configs/shapes_r18.py --checkpoint /tmp/detr_shapes_r18 \
      --format hf --output /tmp/detr_shapes_hf
  python -m detr_jax.export --config configs/detr_r50_coco.py --checkpoint DIR \
      --format official --output /tmp/detr_r50.pth

`hf`: a folder that `transformers.DetrForObjectDetection.from_pretrained(OUT)` loads offline:
`config.json` (`id2label` from the dataset's class names; the backbone as transformers' own
ResNet, which needs neither timm nor a download) and `model.safetensors`. Writing it needs no
torch. DC5 models are written in the published `facebook/detr-resnet-*-dc5` layout instead (a
timm backbone with dilation: transformers' own ResNet has no dilation), so loading them needs
timm.

`official`: `{"model": state_dict}` in facebookresearch/detr names (`models/detr.py`,
`models/transformer.py`, `models/backbone.py`), for `torch.load` and the official code; needs
torch (the `convert` extra).

`detr_jax.convert.from_torch_state_dict` reads both back bit for bit.
"""

import json
import os
import re
import sys
from typing import Any, Mapping

import numpy as np

from detr_jax import convert

FORMATS = ("hf", "official")

# ResNet depths by backbone (torchvision's), and transformers ResNetConfig fields for them.
_RESNETS = {
    "resnet18": ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet34": ("basic", [3, 4, 6, 3], [64, 128, 256, 512]),
    "resnet50": ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
    "resnet101": ("bottleneck", [3, 4, 23, 3], [256, 512, 1024, 2048]),
}
_BN_FIELDS = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _torch_value(kind: str, leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and kind == "conv":
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))  # HWIO -> OIHW
  if leaf == "kernel":
    return np.ascontiguousarray(value.T)  # [in, out] -> [out, in]
  return np.ascontiguousarray(value)


def _backbone_entry(rest: str, leaf: str, hf_resnet: bool) -> str:
  """Backbone module path (after params|batch_stats/backbone/) -> torchvision or HF ResNet name."""
  field = _BN_FIELDS.get(leaf, "weight") if leaf != "kernel" else "weight"
  if rest == "conv1":
    return "embedder.embedder.convolution.weight" if hf_resnet else "conv1.weight"
  if rest == "bn1":
    return (f"embedder.embedder.normalization.{field}" if hf_resnet else f"bn1.{field}")
  match = re.fullmatch(r"layer(\d)_(\d+)/(conv\d|bn\d|downsample_conv|downsample_bn)", rest)
  if not match:
    raise ValueError(f"Unexpected backbone variable backbone/{rest}/{leaf}.")
  stage, block, module = int(match.group(1)), int(match.group(2)), match.group(3)
  if not hf_resnet:
    name = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(module, module)
    return f"layer{stage}.{block}.{name}.{field}"
  prefix = f"encoder.stages.{stage - 1}.layers.{block}"
  if module.startswith("downsample"):
    part = "convolution" if module.endswith("conv") else "normalization"
    return f"{prefix}.shortcut.{part}.{field}"
  index = int(module[-1]) - 1
  part = "convolution" if module.startswith("conv") else "normalization"
  return f"{prefix}.layer.{index}.{part}.{field}"


_OFFICIAL_ATTENTION = {"self_attn": "self_attn", "cross_attn": "multihead_attn"}
_HF_ATTENTION = {"self_attn": "self_attn", "cross_attn": "encoder_attn"}
_HF_PROJ = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "o_proj"}
_HF_ENCODER_NORMS = {"norm1": "self_attn_layer_norm", "norm2": "final_layer_norm"}
_HF_DECODER_NORMS = {"norm1": "self_attn_layer_norm", "norm2": "encoder_attn_layer_norm",
                     "norm3": "final_layer_norm"}


def _leaf_name(leaf: str) -> str:
  return {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}[leaf]


def to_state_dict(variables: Mapping[str, Any], fmt: str,
                  timm_backbone: bool = False) -> dict[str, np.ndarray]:
  """detr_jax variables -> a PyTorch DETR state_dict of float32 numpy arrays.

  Args:
    variables: {"params", "batch_stats"} of `build_model(config.model)`.
    fmt: "official" (facebookresearch/detr names) or "hf" (transformers 5.x
      DetrForObjectDetection names).
    timm_backbone: for "hf", the backbone in the published files' timm (torchvision) names under
      `model.backbone.conv_encoder.model.` instead of transformers' own ResNet.
  """
  from detr_jax import models  # pylint: disable=g-import-not-at-top
  if fmt not in FORMATS:
    raise ValueError(f"Unknown export format {fmt!r}; use one of {FORMATS}.")
  hf = fmt == "hf"
  out: dict[str, np.ndarray] = {}
  qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  for path, value in convert._flatten(variables).items():  # pylint: disable=protected-access
    value = np.asarray(value, np.float32)
    collection, *modules, leaf = path.split("/")
    if collection not in ("params", "batch_stats"):
      continue
    top = modules[0]
    if top == "backbone":
      rest = "/".join(modules[1:])
      name = _backbone_entry(rest, leaf, hf_resnet=hf and not timm_backbone)
      prefix = ("backbone.0.body." if not hf else
                "model.backbone.conv_encoder.model." if timm_backbone else "model.backbone.model.")
      kind = "conv" if leaf == "kernel" else "bn"
      out[prefix + name] = _torch_value(kind, leaf, value)
      continue
    if top == "transformer":
      part = modules[1]
      if part in ("encoder_norm", "decoder_norm"):
        if hf and part == "encoder_norm":
          raise ValueError("transformers' DETR has no pre-norm encoder (config.model.pre_norm); "
                           "export it with --format official.")
        name = ("model.decoder.layernorm" if hf else
                f"transformer.{part.split('_')[0]}.norm")
        out[f"{name}.{_leaf_name(leaf)}"] = value
        continue
      match = re.fullmatch(r"(encoder|decoder)_layer_(\d+)", part)
      if not match:
        raise ValueError(f"Unexpected transformer variable {path}.")
      side, index = match.group(1), int(match.group(2))
      layer = (f"model.{side}.layers.{index}" if hf else f"transformer.{side}.layers.{index}")
      module = modules[2]
      if module in ("self_attn", "cross_attn"):
        projection = modules[3]
        if hf:
          out[f"{layer}.{_HF_ATTENTION[module]}.{_HF_PROJ[projection]}.{_leaf_name(leaf)}"] = (
              _torch_value("linear", leaf, value))
        elif projection == "out":
          out[f"{layer}.{_OFFICIAL_ATTENTION[module]}.out_proj.{_leaf_name(leaf)}"] = (
              _torch_value("linear", leaf, value))
        else:
          key = (f"{layer}.{_OFFICIAL_ATTENTION[module]}", _leaf_name(leaf))
          qkv.setdefault(key, {})[projection] = _torch_value("linear", leaf, value)
      elif module in ("linear1", "linear2"):
        name = f"mlp.fc{module[-1]}" if hf else module
        out[f"{layer}.{name}.{_leaf_name(leaf)}"] = _torch_value("linear", leaf, value)
      elif module.startswith("norm"):
        norms = _HF_ENCODER_NORMS if side == "encoder" else _HF_DECODER_NORMS
        name = norms[module] if hf else module
        out[f"{layer}.{name}.{_leaf_name(leaf)}"] = value
      else:
        raise ValueError(f"Unexpected transformer variable {path}.")
      continue
    if top == "class_embed":
      name = "class_labels_classifier" if hf else "class_embed"
      out[f"{name}.{_leaf_name(leaf)}"] = _torch_value("linear", leaf, value)
    elif top == "bbox_embed":
      layer = int(modules[1].split("_")[1])
      name = "bbox_predictor" if hf else "bbox_embed"
      out[f"{name}.layers.{layer}.{_leaf_name(leaf)}"] = _torch_value("linear", leaf, value)
    elif top == "query_embed":
      out[("model.query_position_embeddings" if hf else "query_embed") + ".weight"] = value
    elif top in models.TRAINING_ONLY_PARAMS:
      continue  # training-only queries (Group DETR, H-DETR): exported is the plain model
    elif top == "input_proj":
      name = "model.input_projection" if hf else "input_proj"
      out[f"{name}.{_leaf_name(leaf)}"] = _torch_value("conv", leaf, value)
    elif top == "position_embedding":
      which = modules[1]  # row_embed | col_embed
      if hf:
        name = {"row_embed": "row_embeddings", "col_embed": "column_embeddings"}[which]
        out[f"model.position_embedding.{name}.weight"] = value
      else:
        out[f"backbone.1.{which}.weight"] = value
    else:
      raise ValueError(f"Unexpected variable {path}.")
  for (attention, field), parts in qkv.items():
    out[f"{attention}.in_proj_{field}"] = np.concatenate(
        [parts["query"], parts["key"], parts["value"]], axis=0)
  return out


def hf_config(model_config, class_names: Mapping[int, str]) -> dict[str, Any]:
  """The transformers `DetrConfig` (as config.json) of `config.model`."""
  backbone = model_config.backbone
  if backbone not in _RESNETS:
    raise ValueError(f"config.model.backbone={backbone!r} has no transformers ResNet layout.")
  if model_config.get("pre_norm", False):
    raise ValueError("transformers' DETR has no pre-norm layers (config.model.pre_norm); export "
                     "with --format official.")
  num_labels = int(model_config.num_classes)
  id2label = {str(i): str(class_names.get(i, "N/A")) for i in range(num_labels)}
  layer_type, depths, hidden_sizes = _RESNETS[backbone]
  config = {
      "architectures": ["DetrForObjectDetection"],
      "model_type": "detr",
      "d_model": int(model_config.hidden_dim),
      "encoder_layers": int(model_config.enc_layers),
      "decoder_layers": int(model_config.dec_layers),
      "encoder_attention_heads": int(model_config.num_heads),
      "decoder_attention_heads": int(model_config.num_heads),
      "encoder_ffn_dim": int(model_config.dim_feedforward),
      "decoder_ffn_dim": int(model_config.dim_feedforward),
      "num_queries": int(model_config.num_queries),
      "dropout": float(model_config.dropout),
      "activation_function": "relu",
      "position_embedding_type": str(model_config.get("position_embedding", "sine")),
      "auxiliary_loss": False,
      "num_channels": 3,
      "id2label": id2label,
      "label2id": {name: int(i) for i, name in id2label.items() if name != "N/A"},
      "use_pretrained_backbone": False,
  }
  if model_config.get("dilation", False):
    # The published DC5 layout: transformers' own ResNet has no dilation; timm's does.
    config.update(use_timm_backbone=True, backbone=backbone, dilation=True, backbone_config=None)
  else:
    config.update(use_timm_backbone=False, backbone=None, dilation=False, backbone_config={
        "model_type": "resnet", "layer_type": layer_type, "depths": depths,
        "hidden_sizes": hidden_sizes, "embedding_size": 64, "out_features": ["stage4"],
        "downsample_in_first_stage": False, "downsample_in_bottleneck": False})
  return config


def export(variables: Mapping[str, Any], model_config, fmt: str, output: str,
           class_names: Mapping[int, str]) -> str:
  """Writes the export; returns the line the command prints.

  Raises:
    ValueError: unknown format, an output that exists, or a model transformers cannot hold.
  """
  if fmt not in FORMATS:
    raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}.")
  output = os.path.abspath(output)
  if os.path.exists(output):
    raise ValueError(f"--output {output} exists; choose a new path.")
  if model_config.get("query_anchors", False):
    raise ValueError("config.model.query_anchors: anchor-point queries have no place in the "
                     "official or transformers DETR; export models trained with "
                     "--config.model.query_anchors=False.")
  if int(model_config.get("backbone_width", 64)) != 64:
    raise ValueError(f"config.model.backbone_width={model_config.backbone_width}: torchvision's "
                     "ResNet (in the official and transformers DETR) has width 64; export models "
                     "trained with the standard width.")
  if int(model_config.get("backbone_stages", 4)) != 4:
    raise ValueError(f"config.model.backbone_stages={model_config.backbone_stages}: the "
                     "official and transformers DETR read layer4 (4 stages); export models "
                     "trained with all four.")
  if fmt == "hf":
    config = hf_config(model_config, class_names)
    state = to_state_dict(variables, "hf", timm_backbone=bool(model_config.get("dilation")))
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    os.makedirs(output)
    save_file(state, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(output, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    return (f"Exported {len(state)} tensors as a transformers DetrForObjectDetection folder at "
            f"{output} (DetrForObjectDetection.from_pretrained({output!r}))")
  state = to_state_dict(variables, "official")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("--format official writes a torch .pth and needs PyTorch: "
                      "pip install -e \".[convert]\" (or use --format hf).") from e
  os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
  torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, output)
  return (f"Exported {len(state)} tensors in facebookresearch/detr names to {output} "
          "(torch.load(path)['model'])")


def _define_flags():
  """The command's flags; defined only when this module runs as the program."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file the checkpoint was trained or "
                                  "converted with.", lock_config=False)
  flags.DEFINE_string("checkpoint", None, "Training workdir or `python -m detr_jax.convert` "
                      "output.")
  flags.DEFINE_enum("format", None, list(FORMATS), "hf: transformers folder; official: .pth.")
  flags.DEFINE_string("output", None, "Folder (hf) or .pth file (official) to write; must not "
                      "exist.")
  flags.mark_flags_as_required(["config", "checkpoint", "format", "output"])


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from detr_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from detr_jax import models  # pylint: disable=g-import-not-at-top
  from detr_jax import predict  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  config = FLAGS.config
  class_names = predict.class_names_for(config)
  if config.model.num_classes <= 0:
    config.model.num_classes = max(class_names) + 1
  variables = checkpointing.load_variables(FLAGS.checkpoint)
  predict.check_variables(variables, config, models.build_model(config.model))
  try:
    print(export(variables, config.model, FLAGS.format, FLAGS.output, class_names))
  except ValueError as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  from detr_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
