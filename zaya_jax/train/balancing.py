"""Expert load balancing: a PID controller on the routers' balancing biases (ZAYA1), or an auxiliary loss.

L layers, X experts, X1 = X + 1 router classes (the last is the skip slot).

The exact ZAYA1 rule is not public (ZAYA_ARCH.md §3.4); this is the rule we chose, per layer and step:
  load_X   = tokens routed to each expert / tokens routed to any expert   (skip-slot tokens excluded)
  error_X  = load_X - 1/X                                                  (> 0: overloaded)
  integral = clip(integral + error, ±integral_limit)
  bias_X  -= kp·error + ki·integral + kd·(error - previous error)
The skip slot is outside the loop: its bias is never moved, so how often a layer skips is left to the router (the
skip rate is logged). The update is centred over experts (the errors sum to zero already; a clipped integral may
not), so it leaves the mean expert bias, and therefore the experts' standing against the skip slot, unchanged.
Padding tokens are not counted. A layer that routed no token to an expert this step has no load to measure: its
controller holds (biases, integral and previous error unchanged).

The auxiliary-loss alternative is the Switch-Transformer loss over the experts, X · Σ_x load_x · mean router prob_x,
with probabilities renormalised over the experts (again excluding the skip slot).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

BALANCING_MODES = ("pid", "aux_loss", "none")


@dataclasses.dataclass(frozen=True)
class BalancingConfig:
  mode: str = "pid"
  # The bias accumulates kp·error, so kp alone already acts as an integrator on the bias (the aux-loss-free rule of
  # DeepSeek-V3 with a proportional step). Chosen with experiments/pid_gain_sweep.py (tiny model, 800 steps of 256
  # tokens; WORKSPACE.md): 1e-4 balances briefly around step 100 and then falls behind the routers as they learn
  # (the busiest of 4 experts holds ~60% of a layer's tokens from step 150 on); 3e-3 flips the whole batch between
  # experts for hundreds of steps while router probabilities are near uniform; 1e-3 holds the busiest share at
  # 31-35% (25% is even) over the last 200 steps.
  kp: float = 1e-3
  ki: float = 0.0
  kd: float = 0.0
  integral_limit: float = 100.0  # anti-windup bound on the accumulated error
  aux_loss_weight: float = 1e-2  # mode="aux_loss" only

  def __post_init__(self):
    if self.mode not in BALANCING_MODES:
      raise ValueError(f"BalancingConfig.mode: {self.mode!r} is not one of {BALANCING_MODES}")
    for name in ("kp", "ki", "kd", "integral_limit", "aux_loss_weight"):
      if getattr(self, name) < 0:
        raise ValueError(f"BalancingConfig.{name}: must be non-negative, got {getattr(self, name)}")


class PIDState(NamedTuple):
  integral_LX: jax.Array  # fp32
  previous_error_LX: jax.Array  # fp32


def init_pid(num_layers: int, num_experts: int) -> PIDState:
  # Two buffers, not one shared: the train step donates its state, and a buffer cannot be donated twice.
  return PIDState(*(jnp.zeros((num_layers, num_experts), jnp.float32) for _ in range(2)))


def expert_load(counts_LX1):
  """Fraction of each layer's expert-routed tokens that went to each expert (skip slot excluded); 0 if none."""
  counts_LX = counts_LX1[:, :-1].astype(jnp.float32)
  total_L1 = counts_LX.sum(axis=1, keepdims=True)
  return jnp.where(total_L1 > 0, counts_LX / jnp.maximum(total_L1, 1.0), 0.0), total_L1[:, 0] > 0


def pid_update(cfg: BalancingConfig, state: PIDState, biases_LX1, counts_LX1):
  """One controller step from this step's per-class token counts: (new biases [L, X1], new state)."""
  load_LX, routed_L = expert_load(counts_LX1)
  X = load_LX.shape[1]
  routed_L1 = routed_L[:, None]
  error_LX = jnp.where(routed_L1, load_LX - 1.0 / X, 0.0)
  integral_LX = jnp.clip(state.integral_LX + error_LX, -cfg.integral_limit, cfg.integral_limit)
  delta_LX = cfg.kp * error_LX + cfg.ki * integral_LX + cfg.kd * (error_LX - state.previous_error_LX)
  # Errors sum to zero over experts, but a clipped integral need not: centring keeps the mean expert bias exact.
  delta_LX = delta_LX - delta_LX.mean(axis=1, keepdims=True)
  # A layer with no routed token holds: biases, integral and previous error as they were (no integral push, and no
  # derivative kick at its next routed step).
  delta_LX = jnp.where(routed_L1, delta_LX, 0.0)
  biases_LX1 = biases_LX1.at[:, :-1].add(-delta_LX.astype(biases_LX1.dtype))
  return biases_LX1, PIDState(jnp.where(routed_L1, integral_LX, state.integral_LX),
                              jnp.where(routed_L1, error_LX, state.previous_error_LX))


def aux_loss(probs_LMX1, choice_LM, valid_M):
  """Switch-style balance loss per layer, averaged over layers (1.0 when perfectly balanced)."""
  X = probs_LMX1.shape[-1] - 1
  probs_LMX = probs_LMX1[..., :X].astype(jnp.float32)
  probs_LMX = probs_LMX / jnp.maximum(probs_LMX.sum(-1, keepdims=True), 1e-9)
  routed_LM = (choice_LM < X) & valid_M[None]
  onehot_LMX = jax.nn.one_hot(choice_LM, X, dtype=jnp.float32) * routed_LM[..., None]
  n_L1 = jnp.maximum(routed_LM.sum(-1, keepdims=True), 1).astype(jnp.float32)
  load_LX = onehot_LMX.sum(1) / n_L1
  mean_prob_LX = (probs_LMX * valid_M[None, :, None]).sum(1) / jnp.maximum(valid_M.sum(), 1)
  return (X * (jax.lax.stop_gradient(load_LX) * mean_prob_LX).sum(-1)).mean()


def routing_metrics(counts_LX1):
  """Per-layer max/min expert token-count ratio, skip rate and routing entropy (nats) of the expert loads."""
  load_LX, _ = expert_load(counts_LX1)
  total_L = counts_LX1.sum(1).astype(jnp.float32)
  skip_rate_L = counts_LX1[:, -1] / jnp.maximum(total_L, 1.0)
  # An expert with no tokens counts as half a token, so a collapsed layer reads large but finite.
  counts_LX = counts_LX1[:, :-1].astype(jnp.float32)
  imbalance_L = counts_LX.max(1) / jnp.maximum(counts_LX.min(1), 0.5)
  entropy_L = -(load_LX * jnp.log(jnp.maximum(load_LX, 1e-12))).sum(1)
  return {"expert_load": load_LX, "load_max_over_min": imbalance_L, "skip_rate": skip_rate_L,
          "load_entropy": entropy_L}
