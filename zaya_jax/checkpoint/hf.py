"""Hugging Face checkpoints in and out: safetensors, native and legacy names, streamed loading.

Loading reads one tensor at a time with plain file reads (no mmap), converts it and places it, so
peak host memory stays near the size of the model itself. Every tensor the model expects must be
present with its shape and a floating dtype; every stored tensor must be used. Errors name the tensor.
Saving writes into a temporary sibling folder and renames it into place, so a half-written folder is
never found under the target name.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from zaya_jax.config import DTYPES, ZayaConfig, legacy_hf_keys
from zaya_jax.folders import check_target, folder_in_place
from zaya_jax.model.decoder import ZayaForCausalLM, abstract_model
from zaya_jax.model.moe import deinterleave_gate_up, gate_up_pairs

SAFE_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")
BALANCING_SUFFIX = "mlp.gate.balancing_biases"
GATE_UP_SUFFIX = "mlp.experts.gate_up_proj"


class CheckpointError(ValueError):
  """A checkpoint that does not match the model: names the tensor or field at fault."""


# -- reading safetensors without mmap ---------------------------------------------------------------

class _TensorEntry:
  __slots__ = ("code", "end", "file", "shape", "start")

  def __init__(self, file, code, shape, start, end):
    self.file, self.code, self.shape, self.start, self.end = file, code, tuple(shape), start, end


def _read_header(file: str) -> dict[str, _TensorEntry]:
  """The tensors a safetensors file lists; CheckpointError when it is not one (a truncated or foreign file would
  otherwise declare a header of any length: a MemoryError, or garbage)."""
  size = os.path.getsize(file)
  with open(file, "rb") as f:
    prefix = f.read(8)
    length = int(np.frombuffer(prefix, "<u8")[0]) if len(prefix) == 8 else -1
    if not 0 < length <= size - 8:
      raise CheckpointError(f"{file} is not a safetensors file: its {size} bytes do not start with a header length "
                            "that fits the file (truncated or another format?)")
    try:
      header = json.loads(f.read(length), object_pairs_hook=_unique_keys)
      base = 8 + length
      entries = {}
      for key, info in header.items():
        if key == "__metadata__":
          continue
        start, end = info["data_offsets"]
        shape, code = info["shape"], info["dtype"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end, *shape)):
          raise ValueError(f"tensor {key}'s shape {shape} or offsets {[start, end]} are not integers")
        if not 0 <= start <= end <= size - base:
          raise ValueError(f"tensor {key}'s bytes [{start}, {end}) run past the file's data")
        itemsize = np.dtype(SAFE_DTYPES[code]).itemsize if code in SAFE_DTYPES else None  # other codes: refused later
        if itemsize is not None and end - start != int(np.prod(shape, dtype=np.int64)) * itemsize:
          raise ValueError(f"tensor {key} holds {end - start} bytes, not the {shape} {code} its header declares")
        entries[key] = _TensorEntry(file, code, shape, base + start, base + end)
      # As the safetensors library requires: the tensors tile the data block, none overlapping another.
      ends = sorted((e.start, e.end, k) for k, e in entries.items())
      for (_, end_a, a), (start_b, _, b) in itertools.pairwise(ends):
        if start_b < end_a:
          raise ValueError(f"tensors {a} and {b} overlap in the file")
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # json's errors are ValueErrors
      raise CheckpointError(f"{file} has an unreadable safetensors header: {e}") from None
  return entries


def _unique_keys(pairs):
  keys = [k for k, _ in pairs]
  if len(set(keys)) != len(keys):
    raise ValueError(f"keys listed twice: {sorted({k for k in keys if keys.count(k) > 1})[:5]}")
  return dict(pairs)


def _read_json(file: str, what: str) -> dict:
  """A JSON object from `file`; CheckpointError naming the file otherwise."""
  try:
    with open(file, encoding="utf-8") as f:
      value = json.load(f)
  except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise CheckpointError(f"{file}: unreadable {what}: {e}") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{file}: the {what} is a JSON {type(value).__name__}, not an object")
  return value


# XLA:CPU adopts host memory aligned to this many bytes instead of copying it (numpy's malloc gives 16).
_ALIGN = 64


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """An uninitialized C-contiguous array whose data starts on an `_ALIGN`-byte boundary."""
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  offset = -raw.ctypes.data % _ALIGN
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _read_tensor(entry: _TensorEntry, out: np.ndarray | None = None) -> np.ndarray:
  """Reads a tensor straight into `out` (or a fresh aligned array): one copy, from the file."""
  dtype = np.dtype(SAFE_DTYPES[entry.code]).newbyteorder("<")
  count = int(np.prod(entry.shape, dtype=np.int64))
  if out is None:
    out = _aligned_empty(entry.shape, dtype)
  with open(entry.file, "rb") as f:
    f.seek(entry.start)
    read = f.readinto(out.reshape(-1).view(np.uint8)) if count else 0
  if read != count * dtype.itemsize:
    raise CheckpointError(f"{entry.file}: tensor data truncated ({read // dtype.itemsize} of {count} elements)")
  return out


def _index_checkpoint(path: str) -> dict[str, _TensorEntry]:
  index_file = os.path.join(path, "model.safetensors.index.json")
  single_file = os.path.join(path, "model.safetensors")
  if os.path.exists(single_file):  # transformers reads this one when both are there
    return _read_header(single_file)
  if os.path.exists(index_file):
    weight_map = _read_json(index_file, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise CheckpointError(f"{index_file}: no \"weight_map\" of tensor names to file names")
    entries = {}
    for file in sorted(set(weight_map.values())):
      shard = os.path.join(path, file)
      if not os.path.isfile(shard):
        raise CheckpointError(f"{index_file} lists the shard {file}, which {path} does not hold")
      for key, entry in _read_header(shard).items():
        if weight_map.get(key) != file:
          raise CheckpointError(f"{file}: tensor {key!r} is not listed for this file in the index")
        entries[key] = entry
    missing = sorted(set(weight_map) - set(entries))
    if missing:
      raise CheckpointError(f"index lists tensors no shard holds: {missing[:5]}")
    return entries
  raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


# -- legacy (80 alternating layers) -> native names ---------------------------------------------------

_LEGACY_ATTN = {
    "input_norm.weight": "input_layernorm.weight",
    "self_attn.qkv.linear_q": "self_attn.qkv_proj.q_proj",
    "self_attn.qkv.linear_k": "self_attn.qkv_proj.k_proj",
    "self_attn.qkv.val_proj1": "self_attn.qkv_proj.v_proj_current",
    "self_attn.qkv.val_proj2": "self_attn.qkv_proj.v_proj_delayed",
    "self_attn.qkv.conv_qk.0": "self_attn.qkv_proj.conv_qk_depthwise",
    "self_attn.qkv.conv_qk.1": "self_attn.qkv_proj.conv_qk_grouped",
    "self_attn.qkv.temp": "self_attn.qk_norm.temp",
    "self_attn.o_proj": "self_attn.o_proj",
}
_LEGACY_MOE = {
    "input_norm.weight": "post_attention_layernorm.weight",
    "res_scale": "post_attention_residual_scale",
    "router.rmsnorm_eda": "mlp.gate.router_mlp.norm",
    "router.router_mlp.0": "mlp.gate.router_mlp.fc1",
    "router.router_mlp.2": "mlp.gate.router_mlp.fc2",
    "router.router_mlp.4": "mlp.gate.router_mlp.out_proj",
    "router.down_proj": "mlp.gate.down_proj",
    "router.router_states_scale": "mlp.gate.router_states_scale",
    "router.balancing_biases": "mlp.gate.balancing_biases",
}
_LEGACY_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LEGACY_EXPERT = re.compile(r"(?:zaya_block|smoe_block)\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight")


def _rename_prefix(rest: str, table: dict[str, str]) -> str | None:
  for old, new in table.items():
    if rest == old or rest.startswith(old + "."):
      return new + rest[len(old):]
  return None


def legacy_to_native(key: str, num_blocks: int) -> tuple[str, int | None] | None:
  """(native key, expert index or None) for a legacy key; None if the key has no native home."""
  if key in ("model.embed_tokens.weight", "lm_head.weight"):  # the head: an untied model's (same name in both)
    return key, None
  if key == "model.final_norm.weight":
    return "model.norm.weight", None
  if key.startswith("model.res_scale."):
    return f"model.layers.{num_blocks - 1}.post_mlp_residual_scale." + key[len("model.res_scale."):], None
  match = _LEGACY_LAYER.fullmatch(key)
  if not match:
    return None
  n, rest = int(match.group(1)), match.group(2)
  block = n // 2
  if n % 2 == 0:
    if rest.startswith("res_scale."):
      field = rest[len("res_scale."):]
      if n == 0:
        if field.startswith("hidden_states_"):
          return f"model.input_{field}", None
        return None
      return f"model.layers.{block - 1}.post_mlp_residual_scale.{field}", None
    native = _rename_prefix(rest, _LEGACY_ATTN)
  else:
    expert = _LEGACY_EXPERT.fullmatch(rest)
    if expert:
      name = "gate_up_proj" if expert.group(2) == "1" else "down_proj"
      return f"model.layers.{block}.mlp.experts.{name}", int(expert.group(1))
    rest = re.sub(r"^(?:zaya_block|smoe_block)\.", "", rest)
    native = _rename_prefix(rest, _LEGACY_MOE)
  return (f"model.layers.{block}.{native}", None) if native else None


def is_legacy_checkpoint(keys) -> bool:
  return any(".qkv.linear_q." in k or ".zaya_block." in k or ".smoe_block." in k or k == "model.final_norm.weight"
             for k in keys)


def _native_view(raw: dict, entries: dict[str, _TensorEntry]) -> dict:
  """config.json as the weights say to read it. A legacy-only key (say `norm_epsilon`) beside native weights is
  ignored, as transformers ignores it, with a warning; read as a legacy config it would halve num_hidden_layers and
  fail on every tensor's name."""
  stray = legacy_hf_keys(raw)
  if not stray or not entries or is_legacy_checkpoint(entries):
    return raw
  warnings.warn(f"config.json has legacy-layout keys {stray} but the weights are in the native layout: they are "
                "ignored, as transformers ignores them", stacklevel=4)
  return {k: v for k, v in raw.items() if k not in stray}


# -- the model's parameters by checkpoint key -------------------------------------------------------

def flat_params(model_or_state) -> dict[str, nnx.Variable]:
  """{dotted HF key: variable} for a model (or its nnx state); tied lm_head is not a key."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
  return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def _plan(entries: dict[str, _TensorEntry], num_blocks: int, legacy: bool):
  """{native key: [(entry, expert index or None)]} and the stored keys with no native home."""
  plan: dict[str, list] = {}
  unused = []
  for key, entry in entries.items():
    target = legacy_to_native(key, num_blocks) if legacy else (key, None)
    if target is None:
      unused.append(key)
      continue
    plan.setdefault(target[0], []).append((entry, target[1], key))
  return plan, unused


def _assemble(native_key: str, parts, shape: tuple[int, ...]) -> np.ndarray:
  for entry, _, stored_key in parts:
    if entry.code not in _FLOAT_CODES:
      raise CheckpointError(f"tensor {stored_key!r}: dtype {entry.code} is not floating point")
  if parts[0][1] is None:
    if len(parts) != 1:
      raise CheckpointError(f"tensor {native_key!r} is stored {len(parts)} times: {[p[2] for p in parts]}")
    entry, _, stored_key = parts[0]
    if entry.shape != shape:
      raise CheckpointError(f"tensor {stored_key!r}: shape {list(entry.shape)} != expected {list(shape)}")
    return _read_tensor(entry)
  # Legacy experts: one stored tensor per expert, stacked along the first axis.
  indices = sorted(p[1] for p in parts)
  if indices != list(range(shape[0])):
    raise CheckpointError(f"tensor {native_key!r}: legacy experts {indices} stored, expected 0..{shape[0] - 1}")
  # Stacked in the widest stored dtype: experts stored in mixed dtypes lose nothing before the final conversion.
  widest = np.result_type(*{np.dtype(SAFE_DTYPES[entry.code]) for entry, _, _ in parts})
  out = _aligned_empty(shape, widest.newbyteorder("<"))
  for entry, e, stored_key in parts:
    if entry.shape != shape[1:]:
      raise CheckpointError(f"tensor {stored_key!r}: shape {list(entry.shape)} != expected {list(shape[1:])}")
    if out.dtype == np.dtype(SAFE_DTYPES[entry.code]):
      _read_tensor(entry, out=out[e])  # straight into the stack: no per-expert temporary
    else:
      out[e] = _read_tensor(entry)
  return out


def skip_slot_reachable(biases_X1: np.ndarray) -> bool:
  """Whether some router probabilities select the skip slot: 1 + b_skip > max expert bias."""
  biases_X1 = np.asarray(biases_X1, np.float32)
  return bool(1.0 + biases_X1[-1] > biases_X1[:-1].max())


def _stored_float_dtype(entries: dict[str, _TensorEntry]) -> str | None:
  """The dtype name of the checkpoint's embedding (else its first floating tensor), None without one."""
  ordered = sorted(entries, key=lambda k: "embed_tokens" not in k)
  codes = [entries[k].code for k in ordered if entries[k].code in ("F32", "BF16", "F16")]  # the model's dtypes
  return np.dtype(SAFE_DTYPES[codes[0]]).name if codes else None


def read_hf_config(path: str | os.PathLike, **overrides) -> ZayaConfig:
  """The `ZayaConfig` of a Hugging Face folder; without a dtype in config.json, compute and parameters default to
  the stored weights' dtype (what transformers loads; the config's default would round fp32 weights).
  `overrides` replace top-level fields."""
  raw, entries = _open(path)
  return _config(raw, entries, overrides)


def _open(path: str | os.PathLike) -> tuple[dict, dict[str, _TensorEntry]]:
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such folder" if not os.path.exists(path) else f"{path} is not a folder")
  config_file = os.path.join(path, "config.json")
  if not os.path.exists(config_file):
    raise CheckpointError(f"{path}: no config.json")
  raw = _read_json(config_file, "config")
  if "model_type" not in raw and os.path.isdir(os.path.join(path, "checkpoints")):
    raise CheckpointError(f"{path} is a training run directory, not a Hugging Face folder: export it with "
                          "launch/export_hf.py (or load it with zaya_jax.train.checkpointing.load_run)")
  return raw, _index_checkpoint(path)


def _config(raw: dict, entries: dict[str, _TensorEntry], overrides: dict) -> ZayaConfig:
  overrides = dict(overrides)
  raw = _native_view(raw, entries)
  stored = _stored_float_dtype(entries)
  if not (raw.get("dtype") or raw.get("torch_dtype")) and stored is not None:
    overrides.setdefault("dtype", stored)
    overrides.setdefault("param_dtype", stored)
  return ZayaConfig.from_hf(raw, **overrides)


def load_hf(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None,
            **config_overrides) -> ZayaForCausalLM:
  """Loads a Hugging Face ZAYA1 folder (native or legacy layout) into a `ZayaForCausalLM`.

  `dtype` / `param_dtype` default to the checkpoint's dtype; `config_overrides` replace config fields
  (e.g. backends). Balancing biases stay fp32.
  """
  raw, entries = _open(path)
  overrides = dict(config_overrides)
  if dtype is not None:
    overrides["dtype"] = dtype
  if param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  cfg = _config(raw, entries, overrides)
  graphdef, state = nnx.split(abstract_model(cfg))
  # On CPU the aligned buffer becomes the array's storage (no second copy). Waiting for the transfer bounds host
  # memory to one tensor in flight wherever it is copied instead (other backends).
  _fill(os.fspath(path), entries, cfg, flat_params(state),
        lambda key, host: jax.block_until_ready(jax.device_put(host)))
  return nnx.merge(graphdef, state)


def load_hf_into(path: str | os.PathLike, cfg: ZayaConfig, states: Sequence[nnx.State],
                 shardings: Sequence[Any] | None = None) -> None:
  """Fills abstract model states (e.g. a train state's `params` and `biases`, built from `cfg`) with a Hugging Face
  folder's tensors, each converted to its variable's dtype and placed on its sharding as it is read.

  `shardings` mirrors `states` (e.g. `ShardingPlan.shardings(state.params)`); without it every tensor goes to the
  default device. Each process reads whole tensors and keeps the shards its devices hold. The folder's architecture
  must be `cfg`'s (`check_same_architecture`); tensors are checked as `load_hf` checks them.
  """
  raw, entries = _open(path)
  check_same_architecture(cfg, _config(raw, entries, {}), what=os.fspath(path))
  expected: dict[str, nnx.Variable] = {}
  placement: dict[str, Any] = {}
  for i, state in enumerate(states):
    expected.update(flat_params(state))
    if shardings is not None:
      placement.update({k: v.get_value() if isinstance(v, nnx.Variable) else v
                        for k, v in flat_params(shardings[i]).items()})

  def place(key, host):
    sharding = placement.get(key)
    if sharding is None:
      return jax.block_until_ready(jax.device_put(host))
    return jax.block_until_ready(jax.make_array_from_callback(host.shape, sharding, lambda index: host[index]))

  _fill(os.fspath(path), entries, cfg, expected, place)


# Fields that change how a model runs or what it is told, not the function its weights compute.
_RUNTIME_FIELDS = frozenset({"dtype", "param_dtype", "attention.backend", "moe.backend", "max_position_embeddings",
                             "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "remat"})


def check_same_architecture(cfg: ZayaConfig, checkpoint: ZayaConfig, *, what: str) -> None:
  """Raises CheckpointError naming each architecture field in which `cfg` differs from the checkpoint's config
  (runtime settings such as dtypes, backends and the context limit may differ)."""
  def flat(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, dict):
        yield from flat(v, f"{prefix}{k}.")
      else:
        yield f"{prefix}{k}", v
  def fields(c: ZayaConfig) -> dict:
    d = dataclasses.asdict(c)
    d["layer_types"] = tuple(c.layer_type(i) for i in range(c.num_layers))  # () is every layer "hybrid"
    return dict(flat(d))
  ours, theirs = fields(cfg), fields(checkpoint)
  differ = [f"model.{k}: {ours[k]!r} here, {theirs[k]!r} in the checkpoint" for k in ours
            if k not in _RUNTIME_FIELDS and ours[k] != theirs.get(k)]
  if differ:
    raise CheckpointError(f"{what}: the model config differs from the checkpoint's config.json: " + "; ".join(differ))


def _fill(path: str, entries: dict[str, _TensorEntry], cfg: ZayaConfig,
          expected: dict[str, nnx.Variable], place: Callable[[str, np.ndarray], jax.Array]) -> None:
  """Sets each expected variable to its checkpoint tensor (in the variable's dtype), placed by `place(key, host)`,
  one tensor at a time; every expected tensor must be stored and every stored one used."""
  legacy = is_legacy_checkpoint(entries)  # the weights' names decide (_native_view read the config the same way)
  plan, unused = _plan(entries, cfg.num_layers, legacy)
  if cfg.tie_word_embeddings and "lm_head.weight" in plan:
    unused.append("lm_head.weight")  # tied models must not carry a separate head
    del plan["lm_head.weight"]
  missing = sorted(set(expected) - set(plan))
  extra = sorted(unused + [k for k in plan if k not in expected])
  if missing or extra:
    problems = []
    if missing:
      problems.append(f"missing tensors {missing[:8]}" + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    if extra:
      problems.append(f"unexpected tensors {extra[:8]}" + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else ""))
    raise CheckpointError(f"{path}: " + "; ".join(problems))

  reachable, unusual_skip = [], []
  for key, var in expected.items():
    host = _assemble(key, plan[key], tuple(var.shape))
    if key.endswith(BALANCING_SUFFIX):
      if skip_slot_reachable(host):
        reachable.append(key)
      if host[-1] != -1.0:
        unusual_skip.append(key)
    if key.endswith(GATE_UP_SUFFIX):  # the model pairs gate and up rows (gate_up_pairs), in the same copy
      pairs = gate_up_pairs(host)
      host = _aligned_empty(host.shape, np.dtype(var.dtype))
      np.copyto(host.reshape(pairs.shape), pairs, casting="unsafe")
      del pairs
    elif host.dtype != var.dtype:
      host, stored = _aligned_empty(host.shape, np.dtype(var.dtype)), host
      np.copyto(host, stored, casting="unsafe")  # numpy's rounding, as jnp.asarray(host, dtype) did
      del stored
    var.set_value(place(key, host))
    del host
  if reachable:
    warnings.warn(
        f"{len(reachable)} layer(s) have balancing biases under which the router's skip slot can win "
        f"(1 + b_skip > max expert bias), e.g. {reachable[0]}. Skipped tokens get a zero MoE output here "
        "(native transformers semantics); the legacy fork gives them h * p_skip instead.", stacklevel=3)
  if unusual_skip:
    warnings.warn(
        f"{len(unusual_skip)} layer(s) store a skip-slot balancing bias other than -1, e.g. {unusual_skip[0]}. "
        "It is kept as stored; note that transformers resets it to -1 when it loads a checkpoint.", stacklevel=3)


def _shards(arrays: dict[str, np.ndarray], max_shard_bytes: int) -> Iterator[dict[str, np.ndarray]]:
  shard, size = {}, 0
  for key, array in arrays.items():
    if shard and size + array.nbytes > max_shard_bytes:
      yield shard
      shard, size = {}, 0
    shard[key] = array
    size += array.nbytes
  if shard:
    yield shard


# What a folder written by save_hf holds (one or the other): overwrite=True replaces only a folder with one of them.
SAVED_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json")


def save_hf(model: ZayaForCausalLM, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
            overwrite: bool = False, dtype: str | None = None, extra_files: Sequence[str] = ()) -> None:
  """Writes a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

  Parameters are written in their stored dtype, or converted to `dtype` (round to nearest even, as torch's `.to`;
  the balancing biases stay fp32), sharded with an index past `max_shard_bytes`. `extra_files` (e.g. a tokenizer's
  files) are copied in under their own names; the folder appears complete or not at all.
  """
  path = check_target(path, overwrite=overwrite, own_files=SAVED_MODEL_FILES)  # before the arrays are gathered
  hf_config = model.config.to_hf()  # raises for an ablation variant, before anything is written
  if dtype is not None:
    if dtype not in DTYPES:
      raise ValueError(f"save_hf: dtype must be one of {DTYPES}, got {dtype!r}")
    hf_config["dtype"] = dtype
  names = [os.path.basename(f) for f in extra_files]
  for file, name in zip(extra_files, names, strict=True):
    if not os.path.isfile(file):
      raise FileNotFoundError(f"save_hf: extra file {file} does not exist")
    if name == "config.json" or (name.startswith("model") and ".safetensors" in name) or names.count(name) > 1:
      raise ValueError(f"save_hf: extra file {file} would replace the folder's own {name}")

  def stored(key, var):
    array = np.asarray(jax.device_get(var[...]))
    if dtype is None or key.endswith(BALANCING_SUFFIX):
      return array
    return array.astype(np.dtype(dtype))  # "bfloat16": ml_dtypes' type (imported above)
  arrays = {k: stored(k, v) for k, v in flat_params(model).items()}
  for key in [k for k in arrays if k.endswith(GATE_UP_SUFFIX)]:
    arrays[key] = np.ascontiguousarray(deinterleave_gate_up(arrays[key]))  # the reference's gate, then up rows
  with folder_in_place(path, overwrite=overwrite, own_files=SAVED_MODEL_FILES) as tmp:
    shards = list(_shards(arrays, max_shard_bytes))
    if len(shards) == 1:
      save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
      total = sum(a.nbytes for a in arrays.values())
      with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    for file in extra_files:
      shutil.copyfile(file, os.path.join(tmp, os.path.basename(file)))
