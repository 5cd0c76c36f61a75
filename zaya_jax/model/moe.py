"""ZAYA1 MoE: an MLP router with depth mixing (EDA), top-1 over experts plus a skip slot, and
dropless SwiGLU experts computed by grouped matmuls.

B batch, T sequence, M = B*T tokens, D hidden, R router hidden, X experts, X1 = X + 1 router
classes (the last is the skip slot), F expert FFN width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zaya_jax import sharding
from zaya_jax.config import MoEConfig
from zaya_jax.model.layers import F32, Linear, RMSNorm, const_param, gelu, in_f32, normal_param, param, silu
from zaya_jax.ops.gmm import gmm


class BalancingBiases(nnx.Variable):
  """Per-class selection biases (fp32). Not trained by gradients: the balancing controller moves them."""


class RouterMLP(nnx.Module):

  def __init__(self, size: int, num_classes: int, *, eps: float, std: float, param_dtype, rngs: nnx.Rngs):
    kw = dict(std=std, param_dtype=param_dtype, rngs=rngs)
    self.norm = RMSNorm(size, eps=eps, param_dtype=param_dtype, axis="router")
    self.fc1 = Linear(size, size, bias=True, axes=("router", "router_in"), **kw)
    self.fc2 = Linear(size, size, bias=True, axes=("router", "router_in"), **kw)
    self.out_proj = Linear(size, num_classes, bias=False, axes=("classes", "router"), **kw)

  def __call__(self, r_BTR):
    u = gelu(self.fc1(self.norm(r_BTR)))
    u = gelu(self.fc2(u))
    return self.out_proj(u)


def _init_biases(num_classes: int) -> BalancingBiases:
  biases = jnp.zeros((num_classes,), F32).at[-1].set(-1.0)
  return param(biases, ("classes",), BalancingBiases)


def _nth_element_top1(scores_X1):
  """One token: the class torch.topk(k=1) picks on CPU. For fewer than 64 classes torch runs libstdc++'s
  std::nth_element over (value, index) pairs with a strict "greater" comparator (ATen's TopKImpl.h); with k = 1 its
  answer is decided by the introselect partitions (median-of-three pivot, unguarded Hoare partition; at most
  2 floor(log2 n) of them), after which the insertion sort (or heap select) keeps the first maximum of the range
  left. Emulated here step for step; checked against torch on rows full of ties (tests/test_parity.py)."""
  n = scores_X1.shape[0]
  v0 = jnp.where(jnp.isnan(scores_X1), jnp.inf, scores_X1)  # torch orders NaN first

  def swap(v, ix, i, j):
    return v.at[i].set(v[j]).at[j].set(v[i]), ix.at[i].set(ix[j]).at[j].set(ix[i])

  def partition(state):  # the range is always [0, last): the wanted position 0 never leaves it
    v, ix, last, depth = state
    a, b, c = 1, last // 2, last - 1
    ab, bc, ac = v[a] > v[b], v[b] > v[c], v[a] > v[c]
    median = jnp.where(ab, jnp.where(bc, b, jnp.where(ac, c, a)), jnp.where(ac, a, jnp.where(bc, c, b)))
    v, ix = swap(v, ix, 0, median)  # the pivot sits at 0

    def step(s):
      v, ix, lo, hi, _ = s
      lo = jax.lax.while_loop(lambda i: v[i] > v[0], lambda i: i + 1, lo)
      hi = jax.lax.while_loop(lambda i: v[0] > v[i], lambda i: i - 1, hi - 1)
      done = lo >= hi
      v, ix = jax.tree.map(lambda kept, swapped: jnp.where(done, kept, swapped), (v, ix), swap(v, ix, lo, hi))
      return v, ix, jnp.where(done, lo, lo + 1), hi, done

    v, ix, cut, _, _ = jax.lax.while_loop(lambda s: ~s[4], step, (v, ix, jnp.int32(1), last, jnp.bool_(False)))
    return v, ix, cut, depth - 1

  depth = 2 * (n.bit_length() - 1)
  v, ix, last, _ = jax.lax.while_loop(lambda s: (s[2] > 3) & (s[3] > 0), partition,
                                      (v0, jnp.arange(n, dtype=jnp.int32), jnp.int32(n), jnp.int32(depth)))
  live = jnp.arange(n) < last
  return ix[jnp.argmax(live & (v == jnp.max(jnp.where(live, v, -jnp.inf))))]


def top1(scores_BTX1, ties_like_torch: bool = True):
  """int32 argmax over the last axis, ties broken as the reference's torch.topk(k=1) breaks them on CPU.

  Exact ties are common where the balancing biases are equal (a new model, training without PID) and the
  probabilities are bf16; argmax would take the first tied class, torch another. On CPU the emulation runs only
  when a batch has a tie (over all its tokens at once; the tied ones take its answer); other platforms keep the
  first tied class (torch's CUDA topk has rules of its own), and from 64 classes on torch's partial sort also keeps
  the first. Without
  `ties_like_torch` (fp32 probabilities, whose exact ties need identical logits) the first tied class is kept and
  nothing more is compiled: the emulation costs ~0.3 s of compile time per layer."""
  first_BT = jnp.argmax(scores_BTX1, axis=-1).astype(jnp.int32)
  if scores_BTX1.shape[-1] >= 64 or not ties_like_torch:
    return first_BT

  def like_torch_cpu(scores):
    tied_BT = jnp.sum(scores == jnp.max(scores, axis=-1, keepdims=True), axis=-1) > 1

    def emulated():
      flat = jax.vmap(_nth_element_top1)(scores.reshape(-1, scores.shape[-1])).reshape(first_BT.shape)
      return jnp.where(tied_BT, flat, first_BT)

    return jax.lax.cond(jnp.any(tied_BT), emulated, lambda: first_BT)

  return jax.lax.platform_dependent(scores_BTX1, cpu=like_torch_cpu, default=lambda _: first_BT)


def select(logits_BTX1, biases_X1, num_experts: int):
  """Top-1 over experts and the skip slot: (probs, choice, weight). The biases steer the choice only; the output is
  weighted by the unbiased probability, and a skipped token's weight is zero."""
  probs_BTX1 = in_f32(lambda x: jax.nn.softmax(x, axis=-1), logits_BTX1)
  choice_BT = top1(probs_BTX1.astype(F32) + biases_X1, ties_like_torch=probs_BTX1.dtype != F32)
  weight_BT = jnp.take_along_axis(probs_BTX1, choice_BT[..., None], axis=-1)[..., 0]
  weight_BT = jnp.where(choice_BT == num_experts, jnp.zeros_like(weight_BT), weight_BT)
  return probs_BTX1, choice_BT, weight_BT


class Router(nnx.Module):

  def __init__(self, cfg: MoEConfig, hidden_size: int, layer_idx: int, *, eps: float, std: float, param_dtype,
               rngs: nnx.Rngs):
    R = cfg.router_hidden_size
    self.down_proj = Linear(hidden_size, R, bias=True, std=std, param_dtype=param_dtype, rngs=rngs,
                            axes=("router", "embed"))
    # EDA: layer 0 has no previous router state and so no scale (absent from checkpoints too).
    self.router_states_scale = const_param((R,), 1.0, param_dtype, ("router",)) if layer_idx > 0 else None
    self.router_mlp = RouterMLP(R, cfg.num_router_classes, eps=eps, std=std, param_dtype=param_dtype, rngs=rngs)
    self.balancing_biases = _init_biases(cfg.num_router_classes)
    self.num_experts = cfg.num_experts

  def __call__(self, h_BTD, prev_router_state_BTR):
    r_BTR = self.down_proj(h_BTD)
    if self.router_states_scale is not None:
      r_BTR = r_BTR + prev_router_state_BTR * self.router_states_scale[...].astype(r_BTR.dtype)
    logits_BTX1 = self.router_mlp(r_BTR)
    return *select(logits_BTX1, self.balancing_biases[...], self.num_experts), r_BTR


class LinearRouter(nnx.Module):
  """The ablation baseline: logits = W h (one D -> X1 projection), no depth mixing; same top-1 with a skip slot."""

  def __init__(self, cfg: MoEConfig, hidden_size: int, *, std: float, param_dtype, rngs: nnx.Rngs):
    self.out_proj = Linear(hidden_size, cfg.num_router_classes, bias=False, std=std, param_dtype=param_dtype,
                           rngs=rngs, axes=("classes", "embed"))
    self.balancing_biases = _init_biases(cfg.num_router_classes)
    self.num_experts = cfg.num_experts

  def __call__(self, h_BTD, prev_router_state_BTR):
    del prev_router_state_BTR  # no EDA: nothing flows between layers
    return *select(self.out_proj(h_BTD), self.balancing_biases[...], self.num_experts), None


def gate_up_pairs(w_X2FD):
  """The reference's gate_up_proj [X, 2F, D] (gate rows, then up rows) as [X, F, 2, D] gate/up pairs (a view of
  a contiguous array): flattened back to [X, 2F, D], this is `Experts`' row order, gate and up of column j at rows
  2j and 2j + 1. Any contiguous split of the 2F rows (tensor parallelism's) then holds whole gate/up pairs; with
  the halves, a 2-way split put every gate row on one device and every up row on the other, and each call moved
  the weights with an all-to-all to pair them up. numpy or jax arrays."""
  X, F2, D = w_X2FD.shape
  return w_X2FD.reshape(X, 2, F2 // 2, D).swapaxes(1, 2)


def deinterleave_gate_up(w_X2FD):
  """`Experts`' interleaved rows back in the reference's layout (gate rows, then up rows), for export."""
  X, F2, D = w_X2FD.shape
  return w_X2FD.reshape(X, F2 // 2, 2, D).swapaxes(1, 2).reshape(X, F2, D)


def swiglu(gate_up_M2F):
  """silu(gate) * up from a gmm output over `Experts`' interleaved gate_up rows."""
  return silu(gate_up_M2F[..., 0::2]) * gate_up_M2F[..., 1::2]


class Experts(nnx.Module):
  """SwiGLU experts: gate_up_proj [X, 2F, D] with gate and up rows interleaved (`gate_up_pairs`; the
  reference stores the halves, load_hf/save_hf convert), down_proj [X, D, F] as the reference has it."""

  def __init__(self, cfg: MoEConfig, hidden_size: int, *, std: float, param_dtype, rngs: nnx.Rngs):
    X, F, D = cfg.num_experts, cfg.intermediate_size, hidden_size
    self.gate_up_proj = normal_param(rngs, (X, 2 * F, D), std, param_dtype, ("experts", "mlp", "embed"))
    self.down_proj = normal_param(rngs, (X, D, F), std, param_dtype, ("experts", "embed", "mlp"))
    self.backend = cfg.backend

  def __call__(self, h_MD, choice_M, weight_M):
    """Dropless top-1: sort tokens by expert, two grouped matmuls, unsort. Skip-slot rows output zero."""
    plan = sharding.active_plan()
    if plan is not None:
      # On a mesh: tokens stay on their data shard and travel to the experts' owners (zaya_jax.parallel.expert).
      from zaya_jax.parallel.expert import sharded_experts

      return sharded_experts(plan, h_MD, choice_M, weight_M, self.gate_up_proj[...], self.down_proj[...],
                             backend=self.backend)
    X = self.gate_up_proj.shape[0]
    order_M = jnp.argsort(choice_M, stable=True)  # the skip slot (class X) sorts last
    group_sizes_X = jnp.bincount(choice_M, length=X + 1)[:X]
    h_sorted_MD = jnp.take(h_MD, order_M, axis=0)
    gate_up_M2F = gmm(h_sorted_MD, self.gate_up_proj[...], group_sizes_X, backend=self.backend, transpose_rhs=True)
    y_MD = gmm(swiglu(gate_up_M2F), self.down_proj[...], group_sizes_X, backend=self.backend, transpose_rhs=True)
    y_MD = y_MD * jnp.take(weight_M, order_M)[:, None]
    y_MD = jnp.where((jnp.take(choice_M, order_M) < X)[:, None], y_MD, jnp.zeros_like(y_MD))
    return jnp.take(y_MD, jnp.argsort(order_M), axis=0)


class SparseMoeBlock(nnx.Module):

  def __init__(self, cfg: MoEConfig, hidden_size: int, layer_idx: int, *, eps: float, std: float, param_dtype,
               rngs: nnx.Rngs):
    if cfg.router == "linear":
      self.gate = LinearRouter(cfg, hidden_size, std=std, param_dtype=param_dtype, rngs=rngs)
    else:
      self.gate = Router(cfg, hidden_size, layer_idx, eps=eps, std=std, param_dtype=param_dtype, rngs=rngs)
    self.experts = Experts(cfg, hidden_size, std=std, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, h_BTD, prev_router_state_BTR):
    B, T, D = h_BTD.shape
    probs_BTX1, choice_BT, weight_BT, router_state_BTR = self.gate(h_BTD, prev_router_state_BTR)
    out_MD = self.experts(h_BTD.reshape(B * T, D), choice_BT.reshape(-1), weight_BT.reshape(-1))
    return out_MD.reshape(B, T, D), router_state_BTR, (probs_BTX1, choice_BT)
