"""The optimizer: AdamW (or Muon for matrices) with warmup-cosine or WSD, global-norm clipping, masked decay.

Parameter classes, decided by rank and name (the nnx path of a parameter is its Hugging Face key):
- decayed: every parameter of rank >= 2 (linear, expert, conv and embedding weights). Norm weights, biases, residual
  scales and attention temperatures (rank 1) are not decayed.
- Muon (`name="muon"`): linear weights [out, in] and expert weights [X, out, in], orthogonalised per matrix (experts
  as a batch axis). The embedding, an untied LM head, the conv kernels and rank-1 parameters stay on AdamW, as in the
  Muon recipe. Their decay per step matches AdamW's unless `muon_weight_decay` says otherwise.
"""

from __future__ import annotations

import dataclasses

import jax
import optax
from optax import contrib

SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "muon")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = "adamw"
  lr: float = 3e-4  # peak learning rate
  warmup_steps: int = 100
  schedule: str = "cosine"  # after warmup: cosine to min_lr_ratio*lr; wsd: flat, then linear decay over decay_fraction
  min_lr_ratio: float = 0.1
  decay_fraction: float = 0.2  # wsd only: the share of steps spent decaying
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0  # global gradient norm; 0 disables clipping
  muon_lr: float = 0.02  # peak learning rate of the Muon matrices (name="muon")
  # Decoupled decay of the Muon matrices; optax scales it by muon_lr each step. None: weight_decay * lr / muon_lr,
  # the same shrink per step as the AdamW parameters get (weight_decay itself would decay them muon_lr / lr times
  # faster: ~67x with the defaults).
  muon_weight_decay: float | None = None

  def __post_init__(self):
    def require(ok, field, msg):
      if not ok:
        raise ValueError(f"OptimizerConfig.{field}: {msg}")
    require(self.name in OPTIMIZERS, "name", f"{self.name!r} is not one of {OPTIMIZERS}")
    require(self.schedule in SCHEDULES, "schedule", f"{self.schedule!r} is not one of {SCHEDULES}")
    require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
    require(self.muon_lr > 0, "muon_lr", f"must be positive, got {self.muon_lr}")
    require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps",
            f"must be a non-negative int, got {self.warmup_steps!r}")
    require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
    require(0.0 < self.decay_fraction <= 1.0, "decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
    require(0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0, "b1", f"betas must be in [0, 1), got {self.b1}, {self.b2}")
    require(self.weight_decay >= 0, "weight_decay", f"must be non-negative, got {self.weight_decay}")
    require(self.clip_norm >= 0, "clip_norm", f"must be non-negative, got {self.clip_norm}")
    require(self.muon_weight_decay is None or self.muon_weight_decay >= 0, "muon_weight_decay",
            f"must be None or non-negative, got {self.muon_weight_decay}")

  @property
  def muon_decay(self) -> float:
    """The weight decay handed to optax's Muon (which multiplies it by the Muon learning rate)."""
    if self.muon_weight_decay is not None:
      return self.muon_weight_decay
    return self.weight_decay * self.lr / self.muon_lr


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int, peak: float | None = None) -> optax.Schedule:
  peak = cfg.lr if peak is None else peak
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  floor = peak * cfg.min_lr_ratio
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), floor)
  if cfg.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
  # The decay ends at total_steps whatever the warmup took: a run too short for both (decay_fraction 1.0, or the
  # 8B preset's 2000-step warmup in a 2200-step ablation) decays over what the warmup leaves, not past the end.
  decay = min(max(1, round(total_steps * cfg.decay_fraction)), max(total_steps - warmup, 1))
  stable = max(total_steps - decay - warmup, 0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak),
       optax.linear_schedule(peak, floor, decay)], [warmup, warmup + stable])


def _names(params):
  """The dotted parameter name (Hugging Face key) at each leaf; nnx's trailing `.value` attribute is not part of it."""
  def name(path, _):
    return ".".join(str(k.key if isinstance(k, jax.tree_util.DictKey) else k.idx) for k in path
                    if not isinstance(k, jax.tree_util.GetAttrKey))
  return jax.tree_util.tree_map_with_path(name, params)


def decay_mask(params):
  """True for the parameters weight decay applies to (rank >= 2)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def muon_dimensions(params):
  """MuonDimensionNumbers for matrices in [.., out, in] layout, None for parameters that stay on AdamW."""
  def dims(name, p):
    hidden = not any(part in name for part in ("embed_tokens", "lm_head", "conv"))  # the Muon recipe's AdamW set
    if p.ndim == 2 and name.endswith(".weight") and hidden:
      return contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=0)
    if p.ndim == 3 and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
      return contrib.MuonDimensionNumbers(reduction_axis=2, output_axis=1)
    return None
  return jax.tree.map(dims, _names(params), params)


def make_optimizer(cfg: OptimizerConfig, params, total_steps: int) -> optax.GradientTransformation:
  """The optax chain for `params` (an nnx.State of Params or any pytree in the model's layout)."""
  mask = decay_mask(params)
  lr = learning_rate_schedule(cfg, total_steps)
  adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
  if cfg.name == "adamw":
    update = adamw
  else:
    # optax's muon decays its AdamW branch unmasked, so the split is made here: Muon gets only the matrices (all
    # decayed), AdamW the rest with the rank mask.
    dims = muon_dimensions(params)
    labels = jax.tree.map(lambda d: "adam" if d is None else "muon", dims,
                          is_leaf=lambda d: d is None or isinstance(d, contrib.MuonDimensionNumbers))
    muon = contrib.muon(learning_rate_schedule(cfg, total_steps, cfg.muon_lr), beta=cfg.b1, eps=cfg.eps,
                        weight_decay=cfg.muon_decay, muon_weight_dimension_numbers=muon_dimensions)
    update = optax.partition({"muon": muon, "adam": adamw}, labels)
  if cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), update)
  return update
