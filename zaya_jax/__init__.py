"""zaya_jax: ZAYA1 (MoE++) in JAX."""

from zaya_jax.checkpoint.hf import CheckpointError, load_hf, save_hf
from zaya_jax.config import AttentionConfig, MoEConfig, ZayaConfig
from zaya_jax.model.decoder import RouterStats, ZayaForCausalLM, ZayaOutput, forward

__all__ = [
    "AttentionConfig", "CheckpointError", "MoEConfig", "RouterStats", "ZayaConfig", "ZayaForCausalLM", "ZayaOutput",
    "forward", "load_hf", "save_hf",
]
