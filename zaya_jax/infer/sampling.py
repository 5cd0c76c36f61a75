"""Token sampling from next-token logits: greedy, temperature, top-k, top-p (nucleus); pure and jittable.

B batch, V vocab.

The filters follow `transformers`' logits processors in their order (temperature, then top-k, then top-p): top-k
keeps every token whose logit is >= the k-th largest (ties at the boundary are kept, as `TopKLogitsWarper` does);
top-p keeps the smallest set of most likely tokens whose probability mass (after temperature and top-k) is >= p, again
with ties at the boundary, and never fewer than one token. All math is fp32 whatever the logits' dtype.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

MIN_TEMPERATURE = 1e-6  # fp32 logits of a few tens divided by less overflow (1e-39 sampled garbage)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is drawn. Frozen and hashable: it is a static argument of the jitted generate.

  temperature: 0 means greedy (argmax; top_k and top_p are then ignored, and reset to None and 1.0);
    >= MIN_TEMPERATURE divides the logits.
  top_k: keep the k most likely tokens (None: no limit).
  top_p: keep the smallest most-likely set with mass >= top_p (1.0: no limit).
  """

  temperature: float = 1.0
  top_k: int | None = None
  top_p: float = 1.0

  def __post_init__(self):
    # NumPy scalars (settings swept from an array) become Python numbers: the config is a static, hashed jit argument.
    for name, kind in (("temperature", numbers.Real), ("top_k", numbers.Integral), ("top_p", numbers.Real)):
      v = getattr(self, name)
      if isinstance(v, kind) and not isinstance(v, bool | np.bool_):
        object.__setattr__(self, name, int(v) if kind is numbers.Integral else float(v))
    t = self.temperature
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or not (
        t == 0 or t >= MIN_TEMPERATURE):
      raise ValueError(f"SamplingConfig.temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE} "
                       f"(smaller ones overflow fp32 logits), got {t!r}")
    k = self.top_k
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
      raise ValueError(f"SamplingConfig.top_k must be None (no limit) or an int >= 1, got {k!r}")
    p = self.top_p
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
      raise ValueError(f"SamplingConfig.top_p must lie in (0, 1] (1 = no limit), got {p!r}")
    if t == 0:  # greedy ignores them: forgotten, so that every greedy config is one static key (one compile)
      object.__setattr__(self, "top_k", None)
      object.__setattr__(self, "top_p", 1.0)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0



GREEDY = SamplingConfig(temperature=0.0)


def filter_logits(logits_BV, cfg: SamplingConfig):
  """fp32 (logits - row max) / temperature with tokens outside top-k and top-p set to -inf (at least one finite per
  row); the shift changes no probability.

  Cut-offs are values, not positions: every token tied with the last one kept stays (top-k may keep more than k,
  top-p slightly more than the smallest set of mass p). `transformers` cuts by sorted position and drops some of the
  tied tokens, by sort order; with bf16 logits, whose values tie often, the sets differ by those ties (a review
  measured 20-41 extra tokens and +0.0004-0.0008 of kept mass at p = 0.95 on 32K random bf16 logits)."""
  logits_BV = logits_BV.astype(jnp.float32)
  if cfg.greedy:
    return logits_BV
  # Shifted so the row's largest logit is 0 before dividing: at T = 1e-4 a logit of 30 would become 3e5, where fp32
  # steps are 0.03, and the sampler's Gumbel noise and the gaps would round to that step (a review measured draws off
  # the exact softmax, p = 3e-7 over 400k). A row with no finite logit is left as it is.
  max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  logits_BV = (logits_BV - jnp.where(jnp.isfinite(max_B1), max_B1, 0.0)) / jnp.float32(cfg.temperature)
  V = logits_BV.shape[-1]
  if cfg.top_k is not None and cfg.top_k < V:
    kth_B1 = jax.lax.top_k(logits_BV, cfg.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if cfg.top_p < 1:
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    # Token i (in descending order) is needed while the mass of the more likely ones is still short of p; the first
    # always is (mass 0 < p), so at least one survives even when rounding leaves the total mass below p.
    n_keep_B = jnp.sum(mass_before_BV < jnp.float32(cfg.top_p), axis=-1)
    threshold_B1 = jnp.take_along_axis(sorted_BV, (n_keep_B - 1)[:, None], axis=-1)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return logits_BV


def sample(key, logits_BV, cfg: SamplingConfig):
  """Draws one token per row: int32 [B]. Greedy (temperature 0) ignores `key` and takes the first maximum."""
  if logits_BV.ndim != 2:
    raise ValueError(f"logits must be [batch, vocab], got shape {logits_BV.shape}")
  logits_BV = filter_logits(logits_BV, cfg)
  if cfg.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


__all__ = ["GREEDY", "SamplingConfig", "filter_logits", "sample"]
