"""Inference: cached decoding with static-shape states."""

from zaya_jax.infer.decode import DecodeState, decode_step, init_state, prefill

__all__ = ["DecodeState", "decode_step", "init_state", "prefill"]
