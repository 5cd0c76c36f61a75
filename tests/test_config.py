import json
import re

import numpy as np
import pytest

from zaya_jax import AttentionConfig, MoEConfig, ZayaConfig


def test_zaya1_8b_preset_matches_the_native_config():
  cfg = ZayaConfig.zaya1_8b()
  att, moe = cfg.attention, cfg.moe
  assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (40, 2048, 262272)
  assert (att.num_heads, att.num_kv_heads, att.head_dim) == (8, 2, 128)
  assert (moe.num_experts, moe.num_router_classes, moe.router_hidden_size, moe.intermediate_size) == (16, 17, 256, 2048)
  assert (att.cca_time0, att.cca_time1, att.rope_theta) == (2, 2, 5e6)
  assert att.rope("hybrid") == (5e6, 64)
  assert cfg.tie_word_embeddings and all(cfg.layer_type(i) == "hybrid" for i in range(40))


@pytest.mark.parametrize("make, field", [
    (lambda: ZayaConfig.tiny(hidden_size=0), "hidden_size"),
    (lambda: ZayaConfig.tiny(layer_types=("hybrid",)), "layer_types"),
    (lambda: ZayaConfig.tiny(layer_types=("hybrid", "swa")), "layer_types[1]"),
    (lambda: ZayaConfig.tiny(layer_types=("hybrid", "hybrid_sliding")), "attention.sliding_window"),
    (lambda: ZayaConfig.tiny(dtype="float8"), "dtype"),
    (lambda: ZayaConfig.tiny(remat="dots_saveable"), "remat"),
    (lambda: AttentionConfig(num_heads=6, num_kv_heads=4), "attention.num_heads"),
    (lambda: AttentionConfig(partial_rotary_factor=1.5), "attention.partial_rotary_factor"),
    (lambda: AttentionConfig(partial_rotary_factor=0.0), "attention.partial_rotary_factor"),
    (lambda: AttentionConfig(backend="flash"), "attention.backend"),
    (lambda: MoEConfig(num_experts=0), "moe.num_experts"),
    (lambda: MoEConfig(backend="megablox"), "moe.backend"),
    (lambda: ZayaConfig.tiny(num_layers=True), "num_layers"),
    (lambda: ZayaConfig.tiny(initializer_range=-0.02), "initializer_range"),
    (lambda: ZayaConfig.tiny(pad_token_id=512), "pad_token_id"),
    (lambda: ZayaConfig.tiny(eos_token_id=(1, -3)), "eos_token_id"),
    (lambda: ZayaConfig.tiny(bos_token_id=True), "bos_token_id"),
    # Types are checked before any comparison could fail without naming the field (or bool("false") pass as True).
    (lambda: AttentionConfig(rope_theta="5e6"), "attention.rope_theta"),
    (lambda: AttentionConfig(sliding_rope_theta=None), "attention.sliding_rope_theta"),
    (lambda: AttentionConfig(partial_rotary_factor="0.5"), "attention.partial_rotary_factor"),
    (lambda: AttentionConfig(sliding_partial_rotary_factor="0.5"), "attention.sliding_partial_rotary_factor"),
    (lambda: AttentionConfig(rope_theta=True), "attention.rope_theta"),  # a bool is an int to Python, not a number here
    (lambda: AttentionConfig(use_bias=1), "attention.use_bias"),
    (lambda: ZayaConfig.tiny(rms_norm_eps=None), "rms_norm_eps"),
    (lambda: ZayaConfig.tiny(initializer_range="0.02"), "initializer_range"),
    (lambda: ZayaConfig.tiny(tie_word_embeddings="false"), "tie_word_embeddings"),
    (lambda: ZayaConfig.tiny(residual_scaling=None), "residual_scaling"),
])
def test_invalid_configs_name_the_field(make, field):
  with pytest.raises(ValueError, match=re.escape(f"ZayaConfig.{field}:")):
    make()


def test_boundary_values_are_valid():
  assert ZayaConfig.tiny(initializer_range=0.0).initializer_range == 0.0  # zero-initialised weights, as torch allows


def test_bos_and_eos_past_the_vocabulary_warn_as_transformers_does():
  # The spec's tiny reference config (vocab 97) keeps the default eos 106: transformers builds it with a warning,
  # and so does from_hf (only the padding id indexes the embedding).
  from transformers.models.zaya.configuration_zaya import ZayaConfig as ReferenceConfig

  raw = ReferenceConfig(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, num_experts=4, moe_intermediate_size=32,
                        router_hidden_size=8, max_position_embeddings=256).to_dict()
  assert raw["eos_token_id"] == 106
  with pytest.warns(UserWarning, match=r"ZayaConfig.eos_token_id: \[106\] not below vocab_size=97"):
    cfg = ZayaConfig.from_hf(raw)
  assert cfg.eos_token_id == 106 and cfg.to_hf()["eos_token_id"] == 106
  with pytest.warns(UserWarning, match=r"ZayaConfig.bos_token_id: \[600\]"):
    ZayaConfig.tiny(bos_token_id=600)


def test_replace_changes_nested_fields_by_name():
  cfg = ZayaConfig.tiny().replace(hidden_size=96, moe=dict(num_experts=6), attention=dict(head_dim=24))
  assert (cfg.hidden_size, cfg.moe.num_experts, cfg.attention.head_dim) == (96, 6, 24)
  assert cfg.moe.intermediate_size == ZayaConfig.tiny().moe.intermediate_size  # the rest kept
  with pytest.raises(ValueError, match=re.escape("ZayaConfig.moe.num_experts:")):
    ZayaConfig.tiny().replace(moe=dict(num_experts=0))


def test_from_hf_native_with_sliding_layers(tmp_path):
  raw = ZayaConfig.tiny(layer_types=("hybrid", "hybrid_sliding"),
                        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, sliding_window=7)).to_hf()
  (tmp_path / "config.json").write_text(json.dumps(raw))
  cfg = ZayaConfig.from_hf(tmp_path)
  assert cfg.layer_type(1) == "hybrid_sliding" and cfg.attention.sliding_window == 7
  assert cfg.attention.rope("hybrid_sliding") == (1e4, 8)
  assert ZayaConfig.from_hf(raw) == cfg


@pytest.mark.parametrize("rope", [
    None,  # transformers' built-in defaults
    {"hybrid": {"rope_type": "default", "rope_theta": 1e3},  # no factor: the whole head rotates
     "hybrid_sliding": {"rope_theta": 50.0, "partial_rotary_factor": 0.5}},
    {"hybrid": {"rope_theta": 2e4, "partial_rotary_factor": 0.25}, "hybrid_sliding": {"rope_theta": 50.0}},
    "rope_scaling",  # the older key
], ids=["absent", "no-factor", "sliding-no-factor", "rope_scaling"])
def test_rope_settings_are_read_as_transformers_reads_them(rope):
  import torch
  from transformers.models.zaya.configuration_zaya import ZayaConfig as HFConfig
  from transformers.models.zaya.modeling_zaya import ZayaRotaryEmbedding

  from zaya_jax.model.rope import inverse_frequencies

  raw = ZayaConfig.tiny(layer_types=("hybrid", "hybrid_sliding"),
                        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=24, sliding_window=7)).to_hf()
  del raw["rope_parameters"]
  if rope == "rope_scaling":
    raw["rope_scaling"] = {"hybrid": {"rope_theta": 3e3, "partial_rotary_factor": 1.0},
                           "hybrid_sliding": {"rope_theta": 7e3, "partial_rotary_factor": 0.5}}
  elif rope is not None:
    raw["rope_parameters"] = rope
  ours = ZayaConfig.from_hf(raw).attention
  reference = ZayaRotaryEmbedding(HFConfig(**json.loads(json.dumps(raw))))
  for layer_type in ("hybrid", "hybrid_sliding"):
    want = getattr(reference, f"{layer_type}_inv_freq").to(torch.float32).numpy()
    got = inverse_frequencies(*ours.rope(layer_type))
    assert got.shape == want.shape, (layer_type, got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=layer_type)


def test_from_hf_legacy_keys_translate():
  legacy = {"model_type": "zaya", "num_hidden_layers": 80, "ffn_hidden_size": 4096, "zaya_mlp_expansion": 256,
            "moe_router_topk": 1, "norm_epsilon": 1e-5, "num_attention_heads": 8, "num_key_value_heads": 2,
            "kv_channels": 128, "rope_theta": 5e6, "partial_rotary_factor": 0.5, "num_experts": 16,
            "hidden_size": 2048, "vocab_size": 262272, "swa_layers": None, "dtype": "bfloat16"}
  assert ZayaConfig.from_hf(legacy) == ZayaConfig.zaya1_8b()
  with_swa = ZayaConfig.from_hf({**legacy, "num_hidden_layers": 4, "swa_layers": [0, 0, 511, 0]})
  assert with_swa.layer_types == ("hybrid", "hybrid_sliding") and with_swa.attention.sliding_window == 512


@pytest.mark.parametrize("raw, message", [
    ({"model_type": "llama"}, "model_type must be 'zaya'"),
    ({"model_type": "zaya", "num_experts_per_tok": 2}, "num_experts_per_tok=2"),
    ({"model_type": "zaya", "hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "zaya", "dtype": "int8"}, "dtype"),
    # Refused by the reference too (KeyError); they used to fall back to the default theta unseen.
    ({"model_type": "zaya", "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}},
     "one dict per layer type"),
    ({"model_type": "zaya", "rope_parameters": {"hybrid": {"partial_rotary_factor": 0.5}}},
     r"rope_parameters.hybrid has no rope_theta"),
    # Refused by the reference as well; they escaped as raw errors, or (a short list of "hybrid") read as valid.
    ({"model_type": "zaya", "rope_parameters": {"hybrid": [5e6], "hybrid_sliding": {"rope_theta": 1e4}}},
     r"rope_parameters.hybrid must be a dict"),
    ({"model_type": "zaya", "num_hidden_layers": 2, "layer_types": ["hybrid"]},
     r"layer_types must list one type per layer \(num_hidden_layers = 2\)"),
    ({"model_type": "zaya", "num_hidden_layers": 2, "layer_types": []}, "layer_types must list one type per layer"),
    ({"model_type": "zaya", "rms_norm_eps": "abc"}, "rms_norm_eps='abc' is not a number"),
    ({"model_type": "zaya", "rope_parameters": {"hybrid": {"rope_theta": None}}},
     r"rope_parameters.hybrid.rope_theta=None is not a number"),
    # A layer type that layer_types uses needs its own rope dict (the reference raises KeyError): not the default.
    ({"model_type": "zaya", "num_hidden_layers": 2, "layer_types": ["hybrid", "hybrid_sliding"],
      "sliding_window": 4, "rope_parameters": {"hybrid": {"rope_theta": 5e6}}},
     r"rope_parameters.hybrid_sliding must be a dict \(layer_types uses 'hybrid_sliding'\); got None"),
    ({"model_type": "zaya", "rope_parameters": {"hybrid": None, "hybrid_sliding": {"rope_theta": 1e4}}},
     r"rope_parameters.hybrid must be a dict \(layer_types uses 'hybrid'\)"),
    # bool("false") is True: the reference's strict config refuses these as well.
    ({"model_type": "zaya", "tie_word_embeddings": "false"}, r"tie_word_embeddings='false' is not true or false"),
    ({"model_type": "zaya", "attention_bias": None}, r"attention_bias=None is not true or false"),
])
def test_from_hf_rejects_unsupported(raw, message):
  with pytest.raises(ValueError, match=message):
    ZayaConfig.from_hf(raw)


# Every field to_hf writes set away from its default: a field dropped, crossed or defaulted on the way shows.
ODD = ZayaConfig(
    vocab_size=300, hidden_size=48, num_layers=3, layer_types=("hybrid", "hybrid_sliding", "hybrid"),
    attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, cca_time0=3, cca_time1=4, rope_theta=2e4,
                              sliding_rope_theta=3e3, partial_rotary_factor=0.25, sliding_partial_rotary_factor=1.0,
                              sliding_window=9, use_bias=True),
    moe=MoEConfig(num_experts=5, intermediate_size=24, router_hidden_size=12),
    rms_norm_eps=1e-6, max_position_embeddings=333, tie_word_embeddings=False, initializer_range=0.01,
    bos_token_id=3, eos_token_id=(1, 4), pad_token_id=5, dtype="float16", param_dtype="float16")


def test_to_hf_and_from_hf_round_trip_every_field():
  assert ZayaConfig.from_hf(json.loads(json.dumps(ODD.to_hf()))) == ODD
  # The folder's dtype is the stored weights' (param_dtype); compute in another dtype is a load-time choice.
  assert ZayaConfig.tiny(dtype="bfloat16", param_dtype="float32").to_hf()["dtype"] == "float32"


def test_from_hf_defaults_are_the_reference_defaults():
  from transformers.models.zaya.configuration_zaya import ZayaConfig as ReferenceConfig

  reference, ours = ReferenceConfig().to_dict(), ZayaConfig.from_hf({"model_type": "zaya"})
  assert ours == ZayaConfig()
  written = ours.to_hf()
  fields = sorted(set(written) - {"architectures", "dtype"})
  assert len(fields) > 20 and {k: written[k] for k in fields} == {k: reference[k] for k in fields}


def test_legacy_swa_rotary_base_sets_the_sliding_theta():
  legacy = {"model_type": "zaya", "num_hidden_layers": 4, "ffn_hidden_size": 64, "zaya_mlp_expansion": 8,
            "num_attention_heads": 4, "num_key_value_heads": 2, "kv_channels": 8, "hidden_size": 32,
            "vocab_size": 96, "num_experts": 3, "eos_token_id": 1, "swa_layers": [0, 0, 63, 0], "swa_rotary_base": 2e4}
  assert ZayaConfig.from_hf(legacy).attention.rope("hybrid_sliding")[0] == 2e4


@pytest.mark.parametrize("field, change", [
    ("attention.rope_theta", dict(attention=dict(rope_theta=1e4))),
    ("attention.sliding_window", dict(attention=dict(sliding_window=7))),
    ("rms_norm_eps", dict(rms_norm_eps=1e-6)),
    ("tie_word_embeddings", dict(tie_word_embeddings=False)),
])
def test_a_checkpoint_of_another_architecture_is_named(field, change):
  # Compute dtype and context length may differ between a checkpoint and the run that loads it; these may not.
  from zaya_jax.checkpoint.hf import CheckpointError, check_same_architecture

  cfg = ZayaConfig.tiny()
  with pytest.raises(CheckpointError, match=re.escape(f"model.{field}:")):
    check_same_architecture(cfg, cfg.replace(**change), what="ckpt")
  check_same_architecture(cfg, cfg.replace(dtype="bfloat16", max_position_embeddings=64, remat="full"), what="ckpt")


def test_an_override_of_only_blanks_keeps_them():
  # --set=data.doc_separator=$'\n\n' (launch/pretokenize.py's --doc_separator form) was stripped to "" and refused as
  # empty; blanks around a literal still go.
  from zaya_jax.train.experiment import get_experiment, override

  cfg = override(get_experiment("tiny"), ["data.doc_separator=\n\n", "optimizer.lr= 1e-3 ", "data.tokenizer= /t "])
  assert cfg.data.doc_separator == "\n\n" and cfg.optimizer.lr == 1e-3 and cfg.data.tokenizer == "/t"
