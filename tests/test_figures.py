from zaya_jax import ZayaConfig
from zaya_jax.figures import model_figures


def test_zaya1_8b_figures_computed_abstractly():
  cfg = ZayaConfig.zaya1_8b()
  figures = model_figures(cfg)
  # Counts of the reference module tree (ZAYA_ARCH.md §1.4): 8.84B total, ~0.75B active per token.
  assert figures.total_params == 8_840_488_784
  assert figures.embedding_params == 262272 * 2048
  assert figures.expert_params == 40 * 16 * 3 * 2048 * 2048
  assert figures.active_params == 753_608_528
  assert figures.active_params_with_embedding == 1_290_741_584
  # bf16 KV cache: 40 layers x (K + V) x 2 kv heads x 128 x 2 bytes = 40 KiB per token, 8x below 16-head MHA.
  assert figures.kv_cache_bytes_per_token == 40 * 2 * 2 * 128 * 2 == 40960
  assert figures.kv_compression == 8.0
  # Constant per-sequence state, as the decode state stores it: raw [q|k] context (1280 channels x 2, fp32) + the
  # delayed value (128, bf16), per layer.
  assert figures.recurrent_state_bytes_per_sequence == 40 * (1280 * 2 * 4 + 128 * 2)


def test_untied_head_counts_among_the_active_parameters():
  tied, untied = model_figures(ZayaConfig.tiny()), model_figures(ZayaConfig.tiny(tie_word_embeddings=False))
  V, D = 512, 64
  assert untied.total_params - tied.total_params == untied.embedding_params - tied.embedding_params == V * D
  assert untied.active_params == tied.active_params
  assert untied.active_params_with_embedding - untied.active_params == 2 * V * D  # lookup rows and head
