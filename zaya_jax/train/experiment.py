"""Experiment configs: frozen dataclasses registered by name, overridden by dotted `key=value` strings, saved as JSON.

  cfg = get_experiment("tiny")
  cfg = override(cfg, ["optimizer.lr=1e-3", "model.num_layers=4", "model.attention.num_heads=8"])
  save_json(cfg, path); load_json(path) == cfg

An override parses its value as a Python literal (`3e-4`, `True`, `None`, `(1, 2)`, `'text'`), falling back to the
raw string, and must match the field's declared type (an int is accepted for a float field); a nested dataclass is
reached through dots. Every dataclass re-validates itself on replacement, so a bad value fails with the field's name.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from zaya_jax.config import AttentionConfig, MoEConfig, ZayaConfig
from zaya_jax.sharding import ParallelConfig
from zaya_jax.train.balancing import BalancingConfig
from zaya_jax.train.data import DataConfig
from zaya_jax.train.optim import OptimizerConfig
from zaya_jax.train.step import StepConfig


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps: int = 1000
  seed: int = 0  # parameters and the step key (the data order has its own seed in DataConfig)
  log_every: int = 10
  eval_every: int = 200  # 0: only at the end
  eval_batches: int = 4
  checkpoint_every: int = 200
  max_to_keep: int = 3
  async_checkpointing: bool = True
  sample_tokens: int = 48  # sample printed at the end (0: none)
  sample_prompt: str = "import os\n"
  sample_temperature: float = 0.8  # with top_p 0.95 and a fixed key; 0 = greedy (tiny models repeat one token)
  init_from: str | None = None  # a Hugging Face folder whose weights start the run (see from_hf_checkpoint)

  def __post_init__(self):
    for name in ("steps", "log_every", "eval_batches", "checkpoint_every", "max_to_keep"):
      value = getattr(self, name)
      if not (isinstance(value, int) and value > 0):
        raise ValueError(f"LoopConfig.{name}: must be a positive int, got {value!r}")
    for name in ("eval_every", "sample_tokens"):
      if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
        raise ValueError(f"LoopConfig.{name}: must be a non-negative int, got {getattr(self, name)!r}")
    if self.init_from is not None and not (isinstance(self.init_from, str) and self.init_from):
      raise ValueError(f"LoopConfig.init_from: must be a folder path or None, got {self.init_from!r}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  model: ZayaConfig
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  balancing: BalancingConfig = dataclasses.field(default_factory=BalancingConfig)
  step: StepConfig = dataclasses.field(default_factory=StepConfig)
  loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
  parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)  # mesh="" : one device

  # Cross-field checks live where both sides are known for sure: make_data checks the tokenizer against the model's
  # vocabulary (a user tokenizer makes data.vocab_size moot), so overrides can be applied in any order.


def from_hf_checkpoint(cfg: ExperimentConfig, path: str | os.PathLike) -> ExperimentConfig:
  """`cfg` set up to continue training the Hugging Face checkpoint in folder `path` (ZAYA1-8B, or a `save_hf` export).

  The model's architecture becomes the checkpoint's config.json; `cfg.model` keeps only how it runs (compute and
  parameter dtypes, backends, remat). The folder's tokenizer.json (with its tokenizer_config.json) becomes the data's
  tokenizer unless `cfg` names one. `loop.init_from` records the folder: the first launch of a run loads its weights
  (`train_step.create_from_hf`); later launches (with the same folder: `train` refuses another) resume from the
  run's own checkpoints and read only its config and tokenizer. Apply `--set` overrides afterwards; `train` refuses
  architecture fields that then differ from the folder's.
  """
  from zaya_jax.checkpoint.hf import read_hf_config
  from zaya_jax.tokenizer import TOKENIZER_FILE

  if not os.fspath(path):
    raise ValueError("init_from: empty path (a Hugging Face folder is expected)")
  path = os.path.abspath(os.fspath(path))
  runtime = cfg.model
  model = read_hf_config(path, dtype=runtime.dtype, param_dtype=runtime.param_dtype, remat=runtime.remat).replace(
      attention=dict(backend=runtime.attention.backend), moe=dict(backend=runtime.moe.backend))
  data = cfg.data
  if data.tokenizer is None and os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
    data = dataclasses.replace(data, tokenizer=path)
  return dataclasses.replace(cfg, model=model, data=data, loop=dataclasses.replace(cfg.loop, init_from=path))


_REGISTRY: dict[str, Callable[[], ExperimentConfig]] = {}


def register(name: str):
  def wrap(fn):
    _REGISTRY[name] = fn
    return fn
  return wrap


def experiment_names() -> list[str]:
  return sorted(_REGISTRY)


def get_experiment(name: str) -> ExperimentConfig:
  if name not in _REGISTRY:
    raise ValueError(f"unknown experiment config {name!r}; registered: {experiment_names()}")
  return _REGISTRY[name]()


@register("tiny")
def _tiny() -> ExperimentConfig:
  """A 0.18M-parameter model on the embedded corpus: about three minutes on a 2-core CPU (the README's main job)."""
  return ExperimentConfig(
      model=ZayaConfig.tiny(vocab_size=1024),
      data=DataConfig(seq_len=128, batch_size=8, vocab_size=1024),
      optimizer=OptimizerConfig(lr=3e-3, warmup_steps=20, weight_decay=0.01),
      loop=LoopConfig(steps=2000, eval_every=500, checkpoint_every=500, log_every=100))


@register("small20m")
def _small20m() -> ExperimentConfig:
  """~20M parameters (8 experts, 4 layers, hidden 256), for throughput measurements and short CPU studies."""
  return ExperimentConfig(
      model=ZayaConfig.tiny(
          vocab_size=8192, hidden_size=256, num_layers=4,
          attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=64),
          moe=MoEConfig(num_experts=8, intermediate_size=512, router_hidden_size=64)),
      data=DataConfig(seq_len=256, batch_size=8, vocab_size=8192),
      optimizer=OptimizerConfig(lr=1e-3, warmup_steps=100),
      loop=LoopConfig(steps=2000))


@register("zaya1_8b")
def _zaya1_8b() -> ExperimentConfig:
  """ZAYA1-8B with bf16 compute and fp32 master parameters; the real run used the Gemma 3 tokenizer."""
  return ExperimentConfig(
      model=ZayaConfig.zaya1_8b(param_dtype="float32"),
      data=DataConfig(seq_len=4096, batch_size=1024),
      optimizer=OptimizerConfig(name="muon", lr=3e-4, warmup_steps=2000, schedule="wsd"),
      loop=LoopConfig(steps=100_000, checkpoint_every=1000, eval_every=1000))


# -- overrides ------------------------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
  """A Python literal (surrounding blanks ignored), else the text as given: a value of only blanks, such as
  --set=data.doc_separator=$'\\n\\n', stays itself rather than becoming the empty string."""
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    return text.strip() or text


def _matches(value: Any, annotation: Any) -> bool:
  origin = typing.get_origin(annotation)
  if annotation is Any:
    return True
  if origin in (typing.Union, types.UnionType):
    return any(_matches(value, arg) for arg in typing.get_args(annotation))
  if annotation is type(None):
    return value is None
  if origin is tuple:
    args = typing.get_args(annotation)
    if not isinstance(value, tuple):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_matches(v, args[0]) for v in value)
    return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if dataclasses.is_dataclass(annotation):
    return isinstance(value, annotation)
  return isinstance(value, annotation)


def _coerce(value: Any, annotation: Any) -> Any:
  """JSON and literal forms into the declared type: lists to tuples, ints to floats, dicts to dataclasses."""
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    for arg in typing.get_args(annotation):
      if arg is not type(None) and value is not None:
        coerced = _coerce(value, arg)
        if _matches(coerced, arg):
          return coerced
    return value
  if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
    return from_dict(annotation, value)
  if annotation is bool and isinstance(value, str) and value.lower() in ("true", "false"):
    return value.lower() == "true"  # --set=...=true, as shells and YAML spell it
  if origin is tuple and isinstance(value, str) and typing.get_args(annotation)[:1] == (str,):
    # As typed in a shell, comma-separated like absl's list flags: --set=data.paths=/a,/b; an empty value is ().
    return tuple(item.strip() for item in value.split(",")) if value.strip() else ()
  if (origin is tuple or annotation is tuple) and isinstance(value, list):
    args = typing.get_args(annotation)
    inner = args[0] if len(args) == 2 and args[1] is Ellipsis else Any
    return tuple(_coerce(v, inner) for v in value)
  if annotation is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def _field_types(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def override(cfg, assignments: Sequence[str]):
  """`cfg` with each `dotted.field=value` applied in order."""
  for assignment in assignments:
    key, sep, text = assignment.partition("=")
    if not sep or not key:
      raise ValueError(f"override {assignment!r} is not of the form dotted.field=value")
    cfg = _set(cfg, key.strip().split("."), _parse_value(text), key.strip())
  return cfg


def _set(obj, path: list[str], value: Any, full_key: str):
  name = path[0]
  if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
    fields = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
    raise ValueError(f"override {full_key!r}: {type(obj).__name__} has no field {name!r}; fields: {fields}")
  if len(path) > 1:
    return dataclasses.replace(obj, **{name: _set(getattr(obj, name), path[1:], value, full_key)})
  annotation = _field_types(type(obj))[name]
  value = _coerce(value, annotation)
  if isinstance(value, tuple) and "" in value:
    raise ValueError(f"override {full_key!r}: {value!r} has an empty item (a stray comma?)")
  if not _matches(value, annotation):
    readable = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
    raise ValueError(f"override {full_key!r}: {value!r} is not of type {readable} (that of "
                     f"{type(obj).__name__}.{name})")
  return dataclasses.replace(obj, **{name: value})


# -- JSON -----------------------------------------------------------------------------------------------------------


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


def jsonable(obj):
  """obj as it reads back from JSON (tuples become lists), so saved and live settings compare equal."""
  return json.loads(json.dumps(obj))


def changed_settings(saved, now, path: str = "") -> list[str]:
  """Dotted names of the settings that differ between a saved config and the current one (both as JSON reads them
  back). Fields only one side has are ignored: the library may add config sections (with defaults) between a run
  and its resumption."""
  if isinstance(saved, dict) and isinstance(now, dict):
    return [c for k in saved.keys() & now.keys()
            for c in changed_settings(saved[k], now[k], f"{path}.{k}" if path else k)]
  return [] if saved == now else [path]


def setting_at(settings: dict, dotted: str):
  """The value of a setting by the dotted name `changed_settings` gives it (e.g. "moe.intermediate_size")."""
  for key in dotted.split("."):
    settings = settings[key]
  return settings


def from_dict(cls, raw: dict):
  types_ = _field_types(cls)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(raw) - known)
  if unknown:
    raise ValueError(f"{cls.__name__}: unknown fields {unknown} in the saved config")
  required = {f.name for f in dataclasses.fields(cls)
              if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
  missing = sorted(required - set(raw))
  if missing:
    raise ValueError(f"{cls.__name__}: the saved config lacks the required fields {missing}")
  return cls(**{k: _coerce(v, types_[k]) for k, v in raw.items()})


def save_json(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
  """Writes the resolved config atomically (a reader never sees half a file)."""
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "w") as f:
    json.dump(to_dict(cfg), f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def load_json(path: str | os.PathLike) -> ExperimentConfig:
  with open(path) as f:
    return from_dict(ExperimentConfig, json.load(f))
