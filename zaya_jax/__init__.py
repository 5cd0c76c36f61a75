"""zaya_jax: ZAYA1 (MoE++) in JAX."""

from zaya_jax.config import AttentionConfig, MoEConfig, ZayaConfig
from zaya_jax.model.decoder import RouterStats, ZayaForCausalLM, ZayaOutput, forward

__all__ = ["AttentionConfig", "MoEConfig", "RouterStats", "ZayaConfig", "ZayaForCausalLM", "ZayaOutput", "forward"]

from zaya_jax.checkpoint.hf import CheckpointError, load_hf, save_hf

__all__ += ["CheckpointError", "load_hf", "save_hf"]
