"""ZAYA1 configuration: one frozen dataclass per module, composed into `ZayaConfig`.

Field names follow the model's own vocabulary; `ZayaConfig.from_hf` translates a Hugging Face
`config.json` (native `zaya` layout or the legacy 80-layer layout) into it. Every config validates
itself at construction and names the offending field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Literal, get_args

import jax.numpy as jnp

LayerType = Literal["hybrid", "hybrid_sliding"]
_LAYER_TYPES = get_args(LayerType)
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "xla", "pallas")
# "cca" is ZAYA1's. The others exist for ablations (experiments/ablate.py) and share the model's code around them:
# "gqa" plain grouped-query attention (multi-head when num_kv_heads == num_heads), "mla" multi-head latent attention
# (DeepSeek-V2: keys and values from a cached per-token latent, plus one shared RoPE key).
ATTENTION_KINDS = ("cca", "gqa", "mla")
ROUTER_KINDS = ("mlp", "linear")
EXPERT_BACKENDS = ("auto", "tiled", "ragged_dot", "dense", "pallas")
# What each decoder layer keeps for the backward pass (see ZayaConfig.remat).
REMAT_POLICIES = ("none", "full", "dots")


def _require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ValueError(f"ZayaConfig.{field}: {message}")


def _positive(cfg: Any, prefix: str, *names: str) -> None:
  for name in names:
    value = getattr(cfg, name)
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, f"{prefix}{name}",
             f"must be a positive int, got {value!r}")


def _real(cfg: Any, prefix: str, *names: str) -> None:
  """Checked before any comparison, which would otherwise fail on a str or None without naming the field."""
  for name in names:
    value = getattr(cfg, name)
    _require(isinstance(value, int | float) and not isinstance(value, bool), f"{prefix}{name}",
             f"must be a number, got {value!r}")


def _flag(cfg: Any, prefix: str, *names: str) -> None:
  for name in names:  # bool("false") is True: a string or None must not pass for a setting
    _require(isinstance(getattr(cfg, name), bool), f"{prefix}{name}", f"must be True or False, got "
             f"{getattr(cfg, name)!r}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Compressed Convolutional Attention (CCA) with GQA and partial NeoX RoPE (or an ablation's `kind`)."""

  kind: str = "cca"  # see ATTENTION_KINDS; only "cca" is in ZAYA1 checkpoints
  num_heads: int = 8
  num_kv_heads: int = 2
  head_dim: int = 128
  cca_time0: int = 2  # depthwise conv taps
  cca_time1: int = 2  # per-head grouped conv taps
  rope_theta: float = 5e6
  sliding_rope_theta: float = 1e4  # used by "hybrid_sliding" layers
  partial_rotary_factor: float = 0.5
  sliding_partial_rotary_factor: float = 0.5
  sliding_window: int | None = None  # keys k with q - k < window are visible (includes the current token)
  use_bias: bool = False
  mla_kv_rank: int = 64  # kind="mla": width of the cached key/value latent (its RoPE key adds the rotary dim)
  backend: str = "auto"  # see zaya_jax.ops.attention.resolve_backend

  def __post_init__(self):
    _require(self.kind in ATTENTION_KINDS, "attention.kind", f"{self.kind!r} is not one of {ATTENTION_KINDS}")
    _positive(self, "attention.", "num_heads", "num_kv_heads", "head_dim", "cca_time0", "cca_time1", "mla_kv_rank")
    _real(self, "attention.", "rope_theta", "sliding_rope_theta", "partial_rotary_factor",
          "sliding_partial_rotary_factor")
    _flag(self, "attention.", "use_bias")
    _require(self.num_heads % self.num_kv_heads == 0, "attention.num_heads",
             f"{self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    _require(self.num_kv_heads * self.head_dim % 2 == 0, "attention.head_dim",
             "num_kv_heads * head_dim must be even (values are half current, half delayed)")
    for name in ("partial_rotary_factor", "sliding_partial_rotary_factor"):
      factor = getattr(self, name)
      rotary = int(self.head_dim * factor)
      _require(0.0 < factor <= 1.0 and rotary % 2 == 0, f"attention.{name}",
               f"{factor} must be in (0, 1] and give an even rotary dim (head_dim={self.head_dim})")
    for name in ("rope_theta", "sliding_rope_theta"):
      _require(getattr(self, name) > 0, f"attention.{name}", "must be positive")
    _require(self.sliding_window is None or (isinstance(self.sliding_window, int) and self.sliding_window > 0),
             "attention.sliding_window", f"must be None or a positive int, got {self.sliding_window!r}")
    if self.kind == "mla":
      _require(self.partial_rotary_factor < 1.0 and self.sliding_partial_rotary_factor == self.partial_rotary_factor
               and int(self.head_dim * self.partial_rotary_factor) > 0,
               "attention.partial_rotary_factor", "kind='mla' needs one factor giving 0 < rotary dim < head_dim for "
               "both layer types (the rotary dims share a cache row with the latent)")
    _require(self.backend in ATTENTION_BACKENDS, "attention.backend",
             f"{self.backend!r} is not one of {ATTENTION_BACKENDS}")

  @property
  def num_groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def conv_channels(self) -> int:
    return (self.num_heads + self.num_kv_heads) * self.head_dim

  @property
  def conv_context(self) -> int:
    """Raw left context the two causal convolutions see: the conv state length of a decode step (0 unless CCA)."""
    return (self.cca_time0 - 1) + (self.cca_time1 - 1) if self.kind == "cca" else 0

  def rope(self, layer_type: str) -> tuple[float, int]:
    """(theta, rotary_dim) for a layer type."""
    if layer_type == "hybrid_sliding":
      return self.sliding_rope_theta, int(self.head_dim * self.sliding_partial_rotary_factor)
    return self.rope_theta, int(self.head_dim * self.partial_rotary_factor)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """ZAYA1 router (MLP with EDA, top-1 with a skip slot) over SwiGLU experts."""

  num_experts: int = 16
  intermediate_size: int = 2048
  router_hidden_size: int = 256
  router: str = "mlp"  # ZAYA1's MLP router with EDA; "linear": one D -> X1 projection, no depth mixing (ablations)
  backend: str = "auto"  # see zaya_jax.ops.gmm.resolve_backend

  def __post_init__(self):
    _positive(self, "moe.", "num_experts", "intermediate_size", "router_hidden_size")
    _require(self.router in ROUTER_KINDS, "moe.router", f"{self.router!r} is not one of {ROUTER_KINDS}")
    _require(self.backend in EXPERT_BACKENDS, "moe.backend", f"{self.backend!r} is not one of {EXPERT_BACKENDS}")

  @property
  def num_router_classes(self) -> int:
    return self.num_experts + 1  # the last class is the skip ("MoD") slot


@dataclasses.dataclass(frozen=True)
class ZayaConfig:
  vocab_size: int = 262272
  hidden_size: int = 2048
  num_layers: int = 40
  layer_types: tuple[str, ...] = ()  # LayerType each; empty means every layer is "hybrid"
  attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
  moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 131072
  tie_word_embeddings: bool = True
  initializer_range: float = 0.02
  bos_token_id: int | None = 2
  eos_token_id: int | tuple[int, ...] | None = 106
  pad_token_id: int | None = 0
  dtype: str = "bfloat16"  # compute dtype
  param_dtype: str = "bfloat16"
  residual_scaling: bool = True  # False: plain residual adds instead of the learned merges (ablations)
  # Activation rematerialisation per decoder layer, a runtime setting (not in Hugging Face configs; a resume may
  # change it): "none" keeps every intermediate the backward pass needs; "full" keeps only each layer's inputs and
  # recomputes the layer in the backward pass (~1/3 more compute); "dots" also keeps the outputs of the projections,
  # the router and the experts' grouped matmuls (matmuls without batch dims, and ops.gmm's named outputs) and the
  # flash attention kernel's output and log-sum-exp, and recomputes the rest: norms, convolutions, activations (and
  # the attention core on the XLA attention path, whose backward needs its [T, T] probabilities).
  remat: str = "none"

  def __post_init__(self):
    _positive(self, "", "vocab_size", "hidden_size", "num_layers", "max_position_embeddings")
    _require(isinstance(self.attention, AttentionConfig), "attention", "must be an AttentionConfig")
    _require(isinstance(self.moe, MoEConfig), "moe", "must be a MoEConfig")
    _require(isinstance(self.layer_types, tuple), "layer_types", "must be a tuple")
    _require(len(self.layer_types) in (0, self.num_layers), "layer_types",
             f"has {len(self.layer_types)} entries for num_layers={self.num_layers}")
    for i, layer_type in enumerate(self.layer_types):
      _require(layer_type in _LAYER_TYPES, f"layer_types[{i}]", f"{layer_type!r} is not one of {_LAYER_TYPES}")
    _require("hybrid_sliding" not in self.layer_types or self.attention.sliding_window is not None,
             "attention.sliding_window", "must be set when layer_types contains 'hybrid_sliding'")
    _real(self, "", "rms_norm_eps", "initializer_range")
    _flag(self, "", "tie_word_embeddings", "residual_scaling")
    _require(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
    _require(self.initializer_range >= 0, "initializer_range", f"must be non-negative, got {self.initializer_range}")
    eos = self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)
    for name, ids in (("bos_token_id", (self.bos_token_id,)), ("eos_token_id", eos), ("pad_token_id",
                                                                                    (self.pad_token_id,))):
      _require(all(i is None or (isinstance(i, int) and not isinstance(i, bool) and i >= 0) for i in ids), name,
               f"{getattr(self, name)!r} is not a token id (a non-negative int, or None)")
      outside = [i for i in ids if i is not None and i >= self.vocab_size]
      # The padding id indexes the embedding; bos and eos only mark text, so as transformers does, an id past the
      # vocabulary (tiny test configs that keep the default eos 106) is only worth a warning: the model never emits it.
      _require(name != "pad_token_id" or not outside, name, f"{self.pad_token_id} is not a token id below "
               f"vocab_size={self.vocab_size}")
      if outside:
        warnings.warn(f"ZayaConfig.{name}: {outside} not below vocab_size={self.vocab_size}: the model can never "
                      "produce or read it", stacklevel=3)
    for name in ("dtype", "param_dtype"):
      _require(getattr(self, name) in DTYPES, name, f"{getattr(self, name)!r} is not one of {DTYPES}")
    _require(self.remat in REMAT_POLICIES, "remat", f"{self.remat!r} is not one of {REMAT_POLICIES}")

  # -- derived -------------------------------------------------------------------------------------
  def layer_type(self, i: int) -> str:
    return self.layer_types[i] if self.layer_types else "hybrid"

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> ZayaConfig:
    """A copy with `changes`; a dict for `attention` or `moe` changes only the fields it names, e.g.
    `cfg.replace(moe=dict(num_experts=8))`."""
    for name in ("attention", "moe"):
      if isinstance(changes.get(name), dict):
        changes[name] = dataclasses.replace(getattr(self, name), **changes[name])
    return dataclasses.replace(self, **changes)

  # -- presets -------------------------------------------------------------------------------------
  @classmethod
  def zaya1_8b(cls, **overrides) -> ZayaConfig:
    """The native ZAYA1-8B configuration (transformers >= 5.13 layout)."""
    return cls(**overrides)

  @classmethod
  def tiny(cls, **overrides) -> ZayaConfig:
    """A few-hundred-thousand-parameter model for tests and demos, fp32."""
    base = dict(
        vocab_size=512, hidden_size=64, num_layers=2,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16),
        moe=MoEConfig(num_experts=4, intermediate_size=48, router_hidden_size=16),
        max_position_embeddings=1024, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        dtype="float32", param_dtype="float32")
    base.update(overrides)
    return cls(**base)

  # -- Hugging Face interop ------------------------------------------------------------------------
  @classmethod
  def from_hf(cls, path_or_dict: str | os.PathLike | dict, **overrides) -> ZayaConfig:
    """Reads a Hugging Face `config.json` (a folder, the file, or its parsed dict) of model type `zaya`.

    Both the native layout (transformers >= 5.13) and the legacy 80-layer layout (Zyphra fork) are
    understood; `overrides` replace top-level fields afterwards (e.g. `dtype="float32"`).
    """
    if isinstance(path_or_dict, dict):
      raw = dict(path_or_dict)
    else:
      path = os.fspath(path_or_dict)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      with open(path) as f:
        raw = json.load(f)
    model_type = raw.get("model_type")
    if model_type != "zaya":
      raise ValueError(f"config.json: model_type must be 'zaya', got {model_type!r}")
    if is_legacy_hf_config(raw):
      raw = _legacy_to_native_config(raw)
    return cls(**{**_native_hf_to_fields(raw), **overrides})

  @property
  def is_zaya1_architecture(self) -> bool:
    """False for the ablation variants (another attention or router, no residual scaling): not in HF's format."""
    return self.attention.kind == "cca" and self.moe.router == "mlp" and self.residual_scaling

  def to_hf(self) -> dict[str, Any]:
    """The native Hugging Face `config.json` contents of this config."""
    if not self.is_zaya1_architecture:
      raise ValueError(f"ZayaConfig: an ablation variant (attention.kind={self.attention.kind!r}, "
                       f"moe.router={self.moe.router!r}, residual_scaling={self.residual_scaling}) has no Hugging "
                       "Face `zaya` equivalent")
    att, moe = self.attention, self.moe
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    return {
        "architectures": ["ZayaForCausalLM"], "model_type": "zaya",
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_layers,
        "layer_types": [self.layer_type(i) for i in range(self.num_layers)],
        "num_attention_heads": att.num_heads, "num_key_value_heads": att.num_kv_heads,
        "head_dim": att.head_dim, "cca_time0": att.cca_time0, "cca_time1": att.cca_time1,
        "attention_bias": att.use_bias, "sliding_window": att.sliding_window,
        "rope_parameters": {
            "hybrid": {"rope_type": "default", "rope_theta": att.rope_theta,
                       "partial_rotary_factor": att.partial_rotary_factor},
            "hybrid_sliding": {"rope_type": "default", "rope_theta": att.sliding_rope_theta,
                               "partial_rotary_factor": att.sliding_partial_rotary_factor},
        },
        "num_experts": moe.num_experts, "num_experts_per_tok": 1,
        "moe_intermediate_size": moe.intermediate_size, "router_hidden_size": moe.router_hidden_size,
        "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings, "lm_head_bias": False,
        "initializer_range": self.initializer_range,
        "bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_token_id,
        "dtype": self.param_dtype,
    }


# Native keys that carry meaning we do not model; any value other than these defaults is rejected.
_FIXED_NATIVE = {"num_experts_per_tok": 1, "hidden_act": "silu", "lm_head_bias": False}


def _number(raw: dict, key: str, default: float, where: str = "") -> float:
  """raw[key] (default when absent) as a float; anything but an int or float is refused by its name."""
  value = raw.get(key, default)
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise ValueError(f"config.json: {where}{key}={value!r} is not a number")
  return float(value)


def _boolean(raw: dict, key: str, default: bool) -> bool:
  """raw[key] (default when absent); bool("false") would be True, so anything but true/false is refused by name."""
  value = raw.get(key, default)
  if not isinstance(value, bool):
    raise ValueError(f"config.json: {key}={value!r} is not true or false")
  return value


def _native_hf_to_fields(raw: dict) -> dict[str, Any]:
  for key, expected in _FIXED_NATIVE.items():
    if key in raw and raw[key] != expected:
      raise ValueError(f"config.json: {key}={raw[key]!r} is not supported (ZAYA1 uses {expected!r})")
  defaults = ZayaConfig()
  num_layers = raw.get("num_hidden_layers", defaults.num_layers)
  # As transformers reads them: `rope_scaling` (the older name) wins; without either, its built-in defaults (ours);
  # a layer type's dict without a partial_rotary_factor rotates the whole head (compute_default_rope_parameters).
  rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
  if not isinstance(rope, dict) or (rope and not {"hybrid", "hybrid_sliding"} & rope.keys()):
    # A flat {"rope_theta": ...} would otherwise fall back to the defaults unseen (the reference raises KeyError).
    raise ValueError(f"config.json: rope_parameters must hold one dict per layer type, {{'hybrid': {{...}}, "
                     f"'hybrid_sliding': {{...}}}}; got {rope!r}")
  listed = raw.get("layer_types")  # checked below; here only which layer types it uses
  used_types = {t for t in listed if t in _LAYER_TYPES} if isinstance(listed, list) and listed else {"hybrid"}
  for name in sorted(used_types):
    if rope and not isinstance(rope.get(name), dict):  # as the reference fails: not silently the default theta
      raise ValueError(f"config.json: rope_parameters.{name} must be a dict (layer_types uses {name!r}); got "
                       f"{rope.get(name)!r}")
  hybrid = rope.get("hybrid") or {}
  sliding = rope.get("hybrid_sliding") or {}
  for name, params in (("hybrid", hybrid), ("hybrid_sliding", sliding)):
    if not isinstance(params, dict):
      raise ValueError(f"config.json: rope_parameters.{name} must be a dict, got {params!r}")
    if params.get("rope_type", "default") != "default":
      raise ValueError(f"config.json: rope_parameters.{name}.rope_type={params['rope_type']!r} is not supported")
    if params and "rope_theta" not in params:
      raise ValueError(f"config.json: rope_parameters.{name} has no rope_theta (got {params!r})")
  att_defaults = AttentionConfig()
  factor = lambda params, name, default: _number(params, "partial_rotary_factor", 1.0 if params else default,
                                                 f"rope_parameters.{name}.")
  attention = AttentionConfig(
      num_heads=raw.get("num_attention_heads", att_defaults.num_heads),
      num_kv_heads=raw.get("num_key_value_heads", att_defaults.num_kv_heads),
      head_dim=raw.get("head_dim", att_defaults.head_dim),
      cca_time0=raw.get("cca_time0", att_defaults.cca_time0),
      cca_time1=raw.get("cca_time1", att_defaults.cca_time1),
      rope_theta=_number(hybrid, "rope_theta", att_defaults.rope_theta, "rope_parameters.hybrid."),
      partial_rotary_factor=factor(hybrid, "hybrid", att_defaults.partial_rotary_factor),
      sliding_rope_theta=_number(sliding, "rope_theta", att_defaults.sliding_rope_theta,
                                 "rope_parameters.hybrid_sliding."),
      sliding_partial_rotary_factor=factor(sliding, "hybrid_sliding", att_defaults.sliding_partial_rotary_factor),
      sliding_window=raw.get("sliding_window"),
      use_bias=_boolean(raw, "attention_bias", False),
  )
  moe_defaults = MoEConfig()
  moe = MoEConfig(
      num_experts=raw.get("num_experts", moe_defaults.num_experts),
      intermediate_size=raw.get("moe_intermediate_size", moe_defaults.intermediate_size),
      router_hidden_size=raw.get("router_hidden_size", moe_defaults.router_hidden_size),
  )
  layer_types = raw.get("layer_types")
  if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != num_layers):
    # As the reference refuses it: a short list of "hybrid" would otherwise read as "every layer hybrid".
    raise ValueError(f"config.json: layer_types must list one type per layer (num_hidden_layers = {num_layers}); "
                     f"got {layer_types!r}")
  layer_types = tuple(layer_types or ())
  if layer_types and all(t == "hybrid" for t in layer_types):
    layer_types = ()
  dtype = raw.get("dtype") or raw.get("torch_dtype") or defaults.param_dtype
  if dtype not in DTYPES:
    raise ValueError(f"config.json: dtype={dtype!r} is not one of {DTYPES}")
  eos = raw.get("eos_token_id", defaults.eos_token_id)
  return dict(
      vocab_size=raw.get("vocab_size", defaults.vocab_size),
      hidden_size=raw.get("hidden_size", defaults.hidden_size),
      num_layers=num_layers, layer_types=layer_types, attention=attention, moe=moe,
      rms_norm_eps=_number(raw, "rms_norm_eps", defaults.rms_norm_eps),
      max_position_embeddings=raw.get("max_position_embeddings", defaults.max_position_embeddings),
      tie_word_embeddings=_boolean(raw, "tie_word_embeddings", True),
      initializer_range=_number(raw, "initializer_range", defaults.initializer_range),
      bos_token_id=raw.get("bos_token_id", defaults.bos_token_id),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=raw.get("pad_token_id", defaults.pad_token_id),
      dtype=dtype, param_dtype=dtype,
  )


# Keys only the legacy (Zyphra fork / Megatron export) config has.
_LEGACY_MARKERS = ("ffn_hidden_size", "zaya_mlp_expansion", "moe_router_topk", "norm_epsilon", "zaya_layers")


def legacy_hf_keys(raw: dict) -> list[str]:
  """The keys of a config.json that only the legacy layout has."""
  return [key for key in _LEGACY_MARKERS if key in raw]


def is_legacy_hf_config(raw: dict) -> bool:
  return bool(legacy_hf_keys(raw))


def _legacy_to_native_config(raw: dict) -> dict:
  """The config-key translation of the HF converter (ZAYA_ARCH.md §1.2)."""
  if "zaya_layers" in raw:
    raise ValueError("config.json: per-layer 'zaya_layers' lists (the config schema of ZAYA1-base) are not "
                     "supported: zaya_jax reads ZAYA1-8B's native and legacy schemas. ZAYA1-base's weights have the "
                     "legacy layout; its config.json would need the legacy ZAYA1-8B keys as scalars "
                     "(num_hidden_layers, num_attention_heads = query heads, num_key_value_heads, ffn_hidden_size, "
                     "zaya_mlp_expansion, num_experts), which no tool here writes or checks")
  topk = raw.get("moe_router_topk", 1)
  if topk != 1:
    raise ValueError(f"config.json: moe_router_topk={topk} is not supported (ZAYA1 is top-1)")
  legacy_layers = raw.get("num_hidden_layers", 80)
  if legacy_layers % 2:
    raise ValueError(f"config.json: num_hidden_layers={legacy_layers} must be even in the legacy layout")
  # rope_scaling is dropped as the converter drops it (§1.2): kept, it would win over the rope_parameters built here.
  native = {k: v for k, v in raw.items() if k not in _LEGACY_MARKERS and k != "rope_scaling"}
  native["num_hidden_layers"] = legacy_layers // 2
  if "ffn_hidden_size" in raw:
    native["moe_intermediate_size"] = raw["ffn_hidden_size"] // 2
  if "zaya_mlp_expansion" in raw:
    native["router_hidden_size"] = raw["zaya_mlp_expansion"]
  if "norm_epsilon" in raw:
    native["rms_norm_eps"] = raw["norm_epsilon"]
  if raw.get("kv_channels") is not None and "head_dim" not in raw:
    native["head_dim"] = raw["kv_channels"]
  swa = raw.get("swa_layers")
  theta = raw.get("rope_theta", 5e6)
  factor = raw.get("partial_rotary_factor", 0.5)
  native["rope_parameters"] = {
      "hybrid": {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": factor},
      "hybrid_sliding": {"rope_type": "default", "rope_theta": raw.get("swa_rotary_base") or 1e4,
                         "partial_rotary_factor": factor},
  }
  if swa:
    per_block = swa[::2]
    native["layer_types"] = ["hybrid_sliding" if w and w > 0 else "hybrid" for w in per_block]
    windows = [w for w in swa if w]
    if windows:
      native["sliding_window"] = max(windows) + 1  # legacy counts previous tokens only
  return native
