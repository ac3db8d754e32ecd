r"""Forward throughput of DETR-R50: detr_jax (jit, float32) vs Hugging Face DETR (PyTorch eager).

Both models are randomly initialised DETR-R50 (6+6 layers, 100 queries, 92 classes) and run the
same batch in eval mode (JAX: train=False under jit; PyTorch: eval() under no_grad), timed in the
same process in alternating blocks, so the ratio holds on a shared machine.

Command:
  python experiments/bench_model.py --batch 2 --size 512 --iters 5
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from configs import detr_r50_coco
from detr_jax.models import build_model
from detr_jax.models import conv as conv_lib


def _time_blocks(fns, warmup, iters, rounds=2):
  """Median seconds per call of each fn.

  Each fn runs in its own block (warmup, then `iters` timed calls), and the blocks alternate for
  `rounds` rounds so both see similar machine load. Calls are not interleaved one by one: XLA's
  and PyTorch's CPU thread pools keep spinning after a call and would slow the other framework.
  """
  times = [[] for _ in fns]
  for _ in range(rounds):
    for fn, record in zip(fns, times):
      for _ in range(warmup):
        fn()
      for _ in range(iters):
        start = time.perf_counter()
        fn()
        record.append(time.perf_counter() - start)
  return [float(np.median(t)) for t in times]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
  pixel_mask = np.ones((args.batch, args.size, args.size), bool)
  pixel_mask[-1, args.size * 3 // 4:, :] = False  # one padded image, as in real batches

  config = detr_r50_coco.get_config().model
  model = build_model(config)
  images_jax, mask_jax = jnp.asarray(images), jnp.asarray(pixel_mask)
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), images_jax, mask_jax))()
  forward = jax.jit(lambda v, x, m: model.apply(v, x, m, train=False)["pred_boxes"],
                    compiler_options=conv_lib.compiler_options(model.conv_library,
                                                               jax.default_backend()))
  start = time.perf_counter()
  forward(variables, images_jax, mask_jax).block_until_ready()
  compile_s = time.perf_counter() - start

  torch.manual_seed(0)
  hf_config = transformers.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False)
  hf_model = transformers.DetrForObjectDetection(hf_config).eval()
  pixel_values = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  torch_mask = torch.from_numpy(pixel_mask).long()

  def torch_forward():
    with torch.no_grad():
      hf_model(pixel_values=pixel_values, pixel_mask=torch_mask)

  jax_s, torch_s = _time_blocks(
      [lambda: forward(variables, images_jax, mask_jax).block_until_ready(), torch_forward],
      args.warmup, args.iters)

  print(f"device: {jax.devices()[0].device_kind}, cpus: {os.cpu_count()}, "
        f"torch threads: {torch.get_num_threads()}, load average: {os.getloadavg()}")
  print(f"input: batch {args.batch} x {args.size} x {args.size}, median of 2 rounds x "
        f"{args.iters} timed iterations (each block after {args.warmup} warmup)")
  print(f"detr_jax (jit, float32):  {args.batch / jax_s:8.3f} images/s  "
        f"({jax_s * 1e3:.1f} ms/batch, first call incl. compile {compile_s:.1f} s)")
  print(f"HF DETR (torch, eager):   {args.batch / torch_s:8.3f} images/s  "
        f"({torch_s * 1e3:.1f} ms/batch)")
  print(f"ratio detr_jax / HF: {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
  main()
