"""Reference-model fixtures: random tiny `transformers` ZAYA models saved to disk, every parameter drawn fresh."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers


def make_reference(path, *, seed: int, dtype=torch.float32, skip_reachable: bool = False, equal_biases: bool = False,
                   router_out_scale: float = 1.0, **config_kwargs):
  """Builds a random `transformers` ZayaForCausalLM (eager attention and experts) and saves it to `path`.

  The returned model is the saved folder reloaded by `from_pretrained` in `dtype`, the way a user
  gets the reference (RoPE tables and balancing biases stay fp32); a bf16 model is saved again so
  the folder holds bf16 weights.

  All parameters and the balancing biases are redrawn: norms and scales around 1, temperatures
  around 3, balancing biases random (the skip slot unreachable unless `skip_reachable`), or all 0 with
  `equal_biases` (a new model's: exact ties between bf16 probabilities then decide the routing).
  `router_out_scale` multiplies the routers' output projections (small: nearly uniform probabilities).
  """
  torch.manual_seed(seed)
  cfg = transformers.ZayaConfig(**config_kwargs)
  model = transformers.ZayaForCausalLM._from_config(
      cfg, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith(("scale", "norm.weight", "layernorm.weight")):
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("temp"):
        p.copy_(3.0 + 0.5 * noise)
      elif name.endswith("embed_tokens.weight"):
        p.copy_(0.25 * noise)
      else:
        fan_in = p.shape[-1] * (p.shape[-2] if p.ndim == 3 and "conv" in name else 1)
        p.copy_(noise / np.sqrt(fan_in))
      if name.endswith("router_mlp.out_proj.weight"):
        p.mul_(router_out_scale)
    for name, b in model.named_buffers():
      if name.endswith("balancing_biases"):
        # Non-negative expert biases keep the skip slot (bias -1) unreachable, as in released models;
        # biases near -1 let it win. (transformers forces the skip bias itself to -1 when loading.)
        b.copy_(0.05 * torch.randn(b.shape, generator=gen).abs())
        if skip_reachable:
          b.copy_(-0.9 - b)
        if equal_biases:
          b.zero_()
        b[-1] = -1.0
  model.save_pretrained(path)
  model = load_reference(path, dtype)
  if dtype != torch.float32:
    model.save_pretrained(path)
  return model


def load_reference(path, dtype=torch.float32):
  """The reference loaded from `path`, every parameter copied into a fresh (64-byte aligned) allocation: tensors
  mapped from a safetensors file sit at the file's offsets, and torch's CPU matmuls round differently for other
  alignments (the same weights loaded from one file and from shards gave logits 1e-6 apart, safetensors 0.8.0)."""
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=dtype, attn_implementation="eager", experts_implementation="eager").eval()
  with torch.no_grad():
    for p in model.parameters():
      p.data = p.data.clone()
  return model


def reference_logits(model, input_ids: np.ndarray):
  with torch.no_grad():
    out = model(torch.as_tensor(np.asarray(input_ids), dtype=torch.long), output_router_logits=True)
  return out
