"""Small building blocks shared by the ZAYA1 modules, written to round exactly where PyTorch does.

Weights are stored in PyTorch layout (`Linear.weight` is [out, in]) so that a Hugging Face
checkpoint loads by name alone. Parameters live in `param_dtype` and are cast to the compute dtype
at use. The bf16 rules (ZAYA_ARCH.md §8): matmuls accumulate in fp32 and round once, bias included;
each elementwise op rounds to the compute dtype; activations and softmax compute in fp32 and round
once, as PyTorch's CPU kernels do for bf16.

Every parameter carries logical axis names (nnx `out_sharding` metadata, e.g. ("mlp", "embed")) that
`zaya_jax.sharding` maps onto mesh axes; they change nothing on a single device. Names: "vocab", "embed" (D),
"heads" (H*E), "kv" (K*E and its value halves), "conv" (C), "conv_in", "taps", "kv_heads" (K), "experts" (X),
"mlp" (F or 2F), "router" (R), "classes" (X1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32


Axes = tuple[str | None, ...]


def param(value, axes: Axes, kind=nnx.Param) -> nnx.Variable:
  """A variable with logical axis names. Eager sharding is off: the model is built without a mesh, and the
  train step places the state from these names (`zaya_jax.sharding`)."""
  if len(axes) != value.ndim:
    raise ValueError(f"logical axes {axes} do not match the parameter's shape {value.shape}")
  return kind(value, out_sharding=axes, eager_sharding=False)


def normal_param(rngs: nnx.Rngs | None, shape: tuple[int, ...], std: float, dtype, axes: Axes) -> nnx.Param:
  """N(0, std) weights; zeros when `rngs` is None (abstract construction, see `abstract_model`)."""
  if rngs is None:
    return param(jnp.zeros(shape, dtype), axes)
  return param((std * jax.random.normal(rngs.params(), shape, F32)).astype(dtype), axes)


def const_param(shape: tuple[int, ...], value: float, dtype, axes: Axes) -> nnx.Param:
  return param(jnp.full(shape, value, dtype), axes)


def linear(x, weight, bias=None):
  """`x @ weight.T + bias` with fp32 accumulation (bias included) and one rounding to x.dtype."""
  y = jnp.einsum("...i,oi->...o", x, weight.astype(x.dtype), preferred_element_type=F32)
  if bias is not None:
    y = y + bias.astype(x.dtype).astype(F32)
  return y.astype(x.dtype)


def in_f32(fn, x):
  """Applies an elementwise fn in fp32 and rounds once, like PyTorch's CPU kernels for bf16."""
  return fn(x.astype(F32)).astype(x.dtype)


def gelu(x):
  return in_f32(lambda v: jax.nn.gelu(v, approximate=False), x)


def silu(x):
  return in_f32(jax.nn.silu, x)


def scale_by(x, scalar: float):
  """`x * python_scalar` as PyTorch does it: the scalar stays fp32, one rounding."""
  return (x.astype(F32) * scalar).astype(x.dtype)


class Linear(nnx.Module):

  def __init__(self, in_features: int, out_features: int, *, bias: bool, std: float, param_dtype,
               rngs: nnx.Rngs, axes: tuple[str | None, str | None]):
    """`axes`: logical names of (out, in)."""
    self.weight = normal_param(rngs, (out_features, in_features), std, param_dtype, axes)
    self.bias = const_param((out_features,), 0.0, param_dtype, axes[:1]) if bias else None

  def __call__(self, x):
    return linear(x, self.weight[...], None if self.bias is None else self.bias[...])


@jax.custom_jvp
def rounded(x, probe):
  """`x` itself, behind a wall the compiler cannot see through, so that it is rounded where PyTorch's separate
  kernels round it.

  At LLVM's default level XLA:CPU contracts `a * b + c` into one fused multiply-add (one rounding where PyTorch has
  two: 1 fp32 ulp in a quarter of the residual stream's elements, 5-ulp bf16 logits at 64 tokens); XLA rewrites
  `1 / sqrt(v)` into its approximate rsqrt; XLA:CPU's YNNPACK fusions skip bf16 roundings between the ops they take
  (zaya_jax.model.cca). No XLA flag turns these off, and optimization barriers are gone before code generation, so
  `x` passes through an integer xor (which also ends a YNNPACK fusion) with a value the compiler cannot prove zero:
  1 only where `probe` (a runtime tensor broadcastable to `x`) is not finite, where the result is not finite either.
  Values of other dtypes than fp32 pass unchanged: XLA rounds them after every op anyway. Differentiates as the
  identity in `x` (the integer detour has no derivative of its own).
  """
  if x.dtype != F32:
    return x
  flip = jnp.logical_not(jnp.isfinite(probe)).astype(jnp.int32)
  bits = jax.lax.bitcast_convert_type(x, jnp.int32) ^ flip
  return jax.lax.bitcast_convert_type(bits, F32)


@rounded.defjvp
def _rounded_jvp(primals, tangents):
  x, probe = primals
  return rounded(x, probe), tangents[0]


class RMSNorm(nnx.Module):
  """Llama-style RMSNorm: statistics in fp32, cast back, then `weight *` in the input dtype."""

  def __init__(self, size: int, *, eps: float, param_dtype, axis: str = "embed"):
    self.weight = const_param((size,), 1.0, param_dtype, (axis,))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(F32)
    # Squares rounded before they are summed (torch's pow(2)), not fused into multiply-adds with the sum or eps.
    var = jnp.mean(rounded(x32 * x32, x32), axis=-1, keepdims=True) + self.eps
    # 1 / sqrt in two IEEE roundings, as torch.rsqrt computes it on CPU; XLA's rsqrt (which a plain 1 / sqrt
    # becomes) differs from that in a third of the values.
    normed = x32 * (1.0 / rounded(jnp.sqrt(var), var))
    return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class ResidualAdd(nnx.Module):
  """`branch + residual` on the fp32 stream: the merge without ResidualScaling's parameters (ablations)."""

  def __init__(self, size: int, *, param_dtype):
    del size, param_dtype

  def __call__(self, branch_BTD, residual_BTD):
    return branch_BTD.astype(F32) + residual_BTD


class ResidualScaling(nnx.Module):
  """Learned per-channel merge: `(branch + hb) * hs + (residual + rb) * rs`.

  The branch term stays in the compute dtype, the residual term in the fp32 residual stream.
  """

  def __init__(self, size: int, *, param_dtype):
    self.hidden_states_scale = const_param((size,), 1.0, param_dtype, ("embed",))
    self.hidden_states_bias = const_param((size,), 0.0, param_dtype, ("embed",))
    self.residual_scale = const_param((size,), 1.0, param_dtype, ("embed",))
    self.residual_bias = const_param((size,), 0.0, param_dtype, ("embed",))

  def __call__(self, branch_BTD, residual_BTD):
    dtype = branch_BTD.dtype
    branch = (branch_BTD + self.hidden_states_bias[...].astype(dtype)) * self.hidden_states_scale[...].astype(dtype)
    # The residual params are rounded to the compute dtype first, as the reference stores them in it.
    rb = self.residual_bias[...].astype(dtype).astype(F32)
    rs = self.residual_scale[...].astype(dtype).astype(F32)
    return rounded(branch, rs).astype(F32) + rounded((residual_BTD + rb) * rs, rs)
