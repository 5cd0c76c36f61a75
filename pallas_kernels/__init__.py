"""Pallas kernels lowered through Triton (the one Pallas path on ROCm): CCA flash attention and flash decoding
(cca_attention.py, decode_attention.py), the grouped expert matmul (gmm.py), their block tunings (tuning.py) and the
static MI300X report (rocm_report.py). Each has a plain-JAX reference beside it; zaya_jax.ops switches to them.
"""

# The names (`jax.ad_checkpoint.checkpoint_name`) of what flash attention's backward pass needs from its forward
# kernel, the output and the log-sum-exp, for remat policies (zaya_jax's ZayaConfig.remat "dots" keeps them);
# importable without importing Pallas.
FLASH_ATTENTION_RESIDUALS = ("flash_attention_out", "flash_attention_lse")
