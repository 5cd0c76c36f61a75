"""Checkpoint I/O: legacy layout, sharding, named errors for bad checkpoints, the skip-slot warning."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from flax import nnx
from reference import load_reference, make_reference
from safetensors.numpy import load_file, save_file
from test_parity import reference_forward

import zaya_jax
from zaya_jax import CheckpointError, ZayaConfig
from zaya_jax.checkpoint.hf import flat_params

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, moe_intermediate_size=16, num_experts=3, router_hidden_size=8, max_position_embeddings=128,
            bos_token_id=2, eos_token_id=1, pad_token_id=0)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("reference")
  return path, make_reference(path, seed=11, **TINY)


@pytest.fixture
def ids():
  return np.random.default_rng(3).integers(0, TINY["vocab_size"], (2, 9))


def logits_of(model, ids):
  return np.asarray(zaya_jax.forward(model, ids).logits_BTV)


# -- legacy layout ---------------------------------------------------------------------------------

def native_to_legacy(native: dict, num_blocks: int) -> dict:
  """The legacy 80-layer names (ZAYA_ARCH.md §5.2), written independently of the loader's mapping."""
  attn = {"qkv_proj.q_proj": "qkv.linear_q", "qkv_proj.k_proj": "qkv.linear_k",
          "qkv_proj.v_proj_current": "qkv.val_proj1", "qkv_proj.v_proj_delayed": "qkv.val_proj2",
          "qkv_proj.conv_qk_depthwise": "qkv.conv_qk.0", "qkv_proj.conv_qk_grouped": "qkv.conv_qk.1",
          "qk_norm.temp": "qkv.temp"}
  router = {"router_mlp.norm": "rmsnorm_eda", "router_mlp.fc1": "router_mlp.0", "router_mlp.fc2": "router_mlp.2",
            "router_mlp.out_proj": "router_mlp.4"}
  legacy = {}
  for key, value in native.items():
    if key in ("model.embed_tokens.weight", "lm_head.weight"):
      legacy[key] = value
      continue
    if key == "model.norm.weight":
      legacy["model.final_norm.weight"] = value
      continue
    if key.startswith("model.input_hidden_states_"):
      legacy["model.layers.0.res_scale.hidden_states_" + key.rsplit("_", 1)[1]] = value
      continue
    block, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key).groups()
    attn_layer, moe_layer = 2 * int(block), 2 * int(block) + 1
    field = rest.split(".", 1)[-1]
    if rest.startswith("post_mlp_residual_scale."):
      is_last = int(block) == num_blocks - 1
      legacy[f"model.res_scale.{field}" if is_last else f"model.layers.{attn_layer + 2}.res_scale.{field}"] = value
    elif rest.startswith("post_attention_residual_scale."):
      legacy[f"model.layers.{moe_layer}.res_scale.{field}"] = value
    elif rest == "input_layernorm.weight":
      legacy[f"model.layers.{attn_layer}.input_norm.weight"] = value
    elif rest == "post_attention_layernorm.weight":
      legacy[f"model.layers.{moe_layer}.input_norm.weight"] = value
    elif rest.startswith("self_attn."):
      name = rest[len("self_attn."):]
      for new, old in attn.items():
        name = name.replace(new, old)
      legacy[f"model.layers.{attn_layer}.self_attn.{name}"] = value
    elif rest.startswith("mlp.experts."):
      fc = "linear_fc1" if rest.endswith("gate_up_proj") else "linear_fc2"
      for e in range(value.shape[0]):
        legacy[f"model.layers.{moe_layer}.zaya_block.experts.local_experts.{e}.{fc}.weight"] = value[e].copy()
    else:
      name = rest[len("mlp.gate."):]
      for new, old in router.items():
        name = name.replace(new, old)
      legacy[f"model.layers.{moe_layer}.zaya_block.router.{name}"] = value
  return legacy


@pytest.fixture(scope="module")
def untied_reference_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("untied")
  return path, make_reference(path, seed=12, **TINY, tie_word_embeddings=False)


@pytest.mark.parametrize("tied", [True, False])
def test_legacy_layout_loads_to_the_same_logits(reference_dir, untied_reference_dir, tmp_path, ids, tied):
  path, ref = reference_dir if tied else untied_reference_dir
  native = load_file(path / "model.safetensors")
  assert ("lm_head.weight" in native) != tied
  legacy = native_to_legacy(native, TINY["num_hidden_layers"])
  assert len(legacy) == len(native) + 2 * (TINY["num_experts"] - 1) * TINY["num_hidden_layers"]
  write_legacy(legacy, path, tmp_path)
  model = zaya_jax.load_hf(tmp_path)
  assert np.abs(logits_of(model, ids) - reference_forward(ref, ids)[0]).max() <= 1e-5


def write_legacy(legacy: dict, native_path, path) -> None:
  """The legacy tensors and the legacy config.json of the native folder's model into `path`."""
  save_file(legacy, path / "model.safetensors", metadata={"format": "pt"})
  cfg = json.loads((native_path / "config.json").read_text())
  legacy_cfg = {"model_type": "zaya", "num_hidden_layers": 2 * cfg["num_hidden_layers"],
                "ffn_hidden_size": 2 * cfg["moe_intermediate_size"], "zaya_mlp_expansion": cfg["router_hidden_size"],
                "moe_router_topk": 1, "norm_epsilon": cfg["rms_norm_eps"], "kv_channels": cfg["head_dim"],
                "rope_theta": 5e6, "partial_rotary_factor": 0.5, "swa_layers": None,
                **{k: cfg[k] for k in ("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
                                       "num_experts", "max_position_embeddings", "eos_token_id", "dtype",
                                       "tie_word_embeddings")}}
  (path / "config.json").write_text(json.dumps(legacy_cfg))


def test_legacy_tensors_stored_twice_or_experts_misnumbered_are_named(reference_dir, tmp_path):
  path, _ = reference_dir
  legacy = native_to_legacy(load_file(path / "model.safetensors"), TINY["num_hidden_layers"])
  router = next(k for k in legacy if ".zaya_block.router." in k)
  twice = {**legacy, router.replace(".zaya_block.", ".smoe_block."): legacy[router]}  # both legacy spellings
  write_legacy(twice, path, tmp_path)
  with pytest.raises(CheckpointError, match=r"is stored 2 times"):
    zaya_jax.load_hf(tmp_path)
  last = f"local_experts.{TINY['num_experts'] - 1}."  # renamed to a second expert 0 ("00"): as many, not 0..X-1
  misnumbered = {k.replace(last, "local_experts.00."): v for k, v in legacy.items()}
  write_legacy(misnumbered, path, tmp_path)
  with pytest.raises(CheckpointError, match=r"legacy experts \[0, 0, 1\] stored, expected 0..2"):
    zaya_jax.load_hf(tmp_path)


# -- sharding and round trips -------------------------------------------------------------------------

def test_sharded_save_round_trips_and_loads_in_reference(reference_dir, tmp_path, ids):
  path, ref = reference_dir
  model = zaya_jax.load_hf(path)
  zaya_jax.save_hf(model, tmp_path / "sharded", max_shard_bytes=20_000)
  shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
  assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  again = zaya_jax.load_hf(tmp_path / "sharded")
  for key, var in flat_params(model).items():
    np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(flat_params(again)[key][...]), err_msg=key)
  np.testing.assert_array_equal(reference_forward(load_reference(tmp_path / "sharded"), ids)[0],
                                reference_forward(ref, ids)[0])


def test_save_refuses_to_clobber_and_leaves_no_partial_folder(tmp_path):
  model = zaya_jax.ZayaForCausalLM(ZayaConfig.tiny(), rngs=nnx.Rngs(0))
  target = tmp_path / "ckpt"
  zaya_jax.save_hf(model, target)
  with pytest.raises(FileExistsError, match="not empty"):
    zaya_jax.save_hf(model, target)
  zaya_jax.save_hf(model, target, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left behind
  # overwrite replaces an earlier export only: a mistyped path must not delete, e.g., a training run.
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  with pytest.raises(FileExistsError, match=r"run is not an earlier output of this kind \(it holds none of "
                                            r"model.safetensors, model.safetensors.index.json\)"):
    zaya_jax.save_hf(model, run, overwrite=True)
  assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json"]


def test_an_overwrite_that_fails_keeps_the_old_folder(tmp_path, monkeypatch):
  from zaya_jax.checkpoint import hf

  old = zaya_jax.ZayaForCausalLM(ZayaConfig.tiny(), rngs=nnx.Rngs(0))
  target = tmp_path / "ckpt"
  zaya_jax.save_hf(old, target)
  real_replace = os.replace

  def crash_on_the_new_folder(src, dst):
    if os.fspath(dst) == os.fspath(target) and ".tmp-" in os.fspath(src):
      raise KeyboardInterrupt  # killed between moving the old folder aside and renaming the new one in
    return real_replace(src, dst)

  monkeypatch.setattr(hf.os, "replace", crash_on_the_new_folder)
  with pytest.raises(KeyboardInterrupt):
    zaya_jax.save_hf(zaya_jax.ZayaForCausalLM(ZayaConfig.tiny(), rngs=nnx.Rngs(1)), target, overwrite=True)
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the old folder back, nothing else left
  back = flat_params(zaya_jax.load_hf(target))
  assert all(np.array_equal(np.asarray(v[...]), np.asarray(back[k][...])) for k, v in flat_params(old).items())
  with pytest.raises(ValueError, match=r"would replace the folder's own config\.json"):
    zaya_jax.save_hf(old, tmp_path / "other", extra_files=[str(target / "config.json")])


def test_a_config_without_dtype_loads_the_stored_dtype(reference_dir, tmp_path, ids):
  path, ref = reference_dir
  shutil.copytree(path, tmp_path / "run")
  cfg = json.loads((tmp_path / "run" / "config.json").read_text())
  assert cfg.pop("dtype", None) == "float32" and "torch_dtype" not in cfg
  (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
  model = zaya_jax.load_hf(tmp_path / "run")  # as transformers does, not the config's bf16 default
  assert model.config.param_dtype == model.config.dtype == "float32"
  assert np.abs(logits_of(model, ids) - reference_forward(ref, ids)[0]).max() <= 1e-5


def test_bf16_params_load_as_bf16_and_upcast_on_request(tmp_path):
  model = zaya_jax.ZayaForCausalLM(ZayaConfig.tiny(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(1))
  zaya_jax.save_hf(model, tmp_path)
  bf16 = zaya_jax.load_hf(tmp_path)
  f32 = zaya_jax.load_hf(tmp_path, dtype="float32", param_dtype="float32")
  key = "model.layers.0.self_attn.qkv_proj.q_proj.weight"
  assert flat_params(bf16)[key].dtype == np.dtype("bfloat16") and flat_params(f32)[key].dtype == np.float32
  assert flat_params(bf16)["model.layers.0.mlp.gate.balancing_biases"].dtype == np.float32
  # Balancing biases are state, not trainable parameters: a `wrt=nnx.Param` optimizer never sees them.
  trainable = flat_params(nnx.state(bf16, nnx.Param))
  assert trainable and not [k for k in trainable if "balancing" in k]
  np.testing.assert_array_equal(np.asarray(flat_params(f32)[key][...]),
                                np.asarray(flat_params(bf16)[key][...]).astype(np.float32))


# -- bad checkpoints fail with the tensor named -------------------------------------------------------

def test_a_stray_legacy_key_beside_native_weights_is_ignored_as_transformers_does(reference_dir, tmp_path, ids):
  path, ref = reference_dir
  shutil.copytree(path, tmp_path / "run")
  cfg = json.loads((tmp_path / "run" / "config.json").read_text())
  (tmp_path / "run" / "config.json").write_text(json.dumps({**cfg, "norm_epsilon": 1e-3}))
  # Read as a legacy config it halved num_hidden_layers and failed on every tensor's name.
  with pytest.warns(UserWarning, match=r"legacy-layout keys \['norm_epsilon'\] but the weights are in the native"):
    model = zaya_jax.load_hf(tmp_path / "run")
  assert model.config.num_layers == cfg["num_hidden_layers"]
  assert np.abs(logits_of(model, ids) - reference_forward(ref, ids)[0]).max() <= 1e-5


def corrupt(src, dst, edit):
  shutil.copytree(src, dst)
  tensors = load_file(dst / "model.safetensors")
  edit(tensors)
  save_file(tensors, dst / "model.safetensors")
  return dst


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.self_attn.qk_norm.temp"), r"missing tensors \['model.layers.1.self_attn.qk_norm"),
    (lambda t: t.update({"model.layers.0.mlp.gate.router_states_scale": np.ones(8, np.float32)}),
     r"unexpected tensors \['model.layers.0.mlp.gate.router_states_scale'\]"),
    (lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}),
     r"unexpected tensors \['lm_head.weight'\]"),
    (lambda t: t.update({"model.layers.2.self_attn.qkv_proj.q_proj.weight": np.zeros((32, 16), np.float32)}),
     r"'model.layers.2.self_attn.qkv_proj.q_proj.weight': shape \[32, 16\] != expected \[32, 32\]"),
    (lambda t: t.update({"model.layers.2.mlp.experts.down_proj": np.zeros((3, 16, 32), np.float32)}),
     r"'model.layers.2.mlp.experts.down_proj': shape \[3, 16, 32\] != expected \[3, 32, 16\]"),
    (lambda t: t.update({"model.norm.weight": np.ones(32, np.int32)}), r"'model.norm.weight': dtype I32"),
])
def test_bad_tensors_are_named(reference_dir, tmp_path, edit, message):
  path, _ = reference_dir
  bad = corrupt(path, tmp_path / "bad", edit)
  with pytest.raises(CheckpointError, match=message):
    zaya_jax.load_hf(bad)


def _rewrite_header(file, edit):
  """The safetensors file with its JSON header edited (the data bytes untouched)."""
  raw = file.read_bytes()
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8 + n])
  text = edit(header)
  text = (text if isinstance(text, str) else json.dumps(header)).encode()
  text += b" " * (-len(text) % 8)
  file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["model.norm.weight"].update(dtype="F16"), r"model.norm.weight holds 128 bytes, not the \[32\] F16"),
    (lambda h: h["model.layers.1.input_layernorm.weight"].update(
        data_offsets=h["model.layers.0.input_layernorm.weight"]["data_offsets"]), "overlap"),
    (lambda h: h["model.norm.weight"].update(shape=[32.0]), "are not integers"),
    (lambda h: json.dumps(h)[:-1] + ', "model.norm.weight": ' + json.dumps(h["model.norm.weight"]) + "}",
     "keys listed twice"),
])
def test_inconsistent_safetensors_headers_are_refused(reference_dir, tmp_path, edit, message):
  """What the safetensors library itself refuses: a reader that trusted the header returned wrong arrays."""
  path, _ = reference_dir
  shutil.copytree(path, tmp_path / "bad")
  _rewrite_header(tmp_path / "bad" / "model.safetensors", edit)
  with pytest.raises(CheckpointError, match=message):
    zaya_jax.load_hf(tmp_path / "bad")


def test_unreadable_json_and_missing_shards_are_named(reference_dir, tmp_path, ids):
  path, ref = reference_dir
  shutil.copytree(path, tmp_path / "cfg")
  (tmp_path / "cfg" / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match=r"config.json: unreadable config"):
    zaya_jax.load_hf(tmp_path / "cfg")
  model = zaya_jax.load_hf(path)
  zaya_jax.save_hf(model, tmp_path / "sharded", max_shard_bytes=4096)
  shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
  shard.unlink()
  with pytest.raises(CheckpointError, match=rf"lists the shard {shard.name}"):
    zaya_jax.load_hf(tmp_path / "sharded")
  # A folder holding both forms: the single file wins, as in transformers.
  shutil.copy(path / "model.safetensors", tmp_path / "sharded" / "model.safetensors")
  assert np.abs(logits_of(zaya_jax.load_hf(tmp_path / "sharded"), ids) - reference_forward(ref, ids)[0]).max() <= 1e-5


def test_legacy_rope_scaling_is_dropped_as_the_converter_drops_it():
  legacy = dict(model_type="zaya", ffn_hidden_size=64, zaya_mlp_expansion=8, num_hidden_layers=4, hidden_size=32,
                num_attention_heads=4, num_key_value_heads=2, kv_channels=8, vocab_size=96, num_experts=3,
                bos_token_id=2, eos_token_id=1, pad_token_id=0, rope_theta=1e4,
                rope_scaling={"type": "linear", "factor": 1.0})
  assert ZayaConfig.from_hf(legacy).attention.rope_theta == 1e4


def test_wrong_model_type_is_named(reference_dir, tmp_path):
  path, _ = reference_dir
  shutil.copytree(path, tmp_path / "llama")
  cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
  (tmp_path / "llama" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
  with pytest.raises(ValueError, match="model_type must be 'zaya', got 'llama'"):
    zaya_jax.load_hf(tmp_path / "llama")


def test_missing_weights_file_is_named(reference_dir, tmp_path):
  path, _ = reference_dir
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
    zaya_jax.load_hf(tmp_path)


# -- skip slot ---------------------------------------------------------------------------------------

def test_reachable_skip_slot_warns_and_outputs_zero_like_the_reference(tmp_path, ids):
  ref = make_reference(tmp_path, seed=5, skip_reachable=True, **TINY)
  with pytest.warns(UserWarning, match="skip slot can win"):
    model = zaya_jax.load_hf(tmp_path)
  out = zaya_jax.forward(model, ids)
  ref_logits, ref_choices = reference_forward(ref, ids)
  choices = np.asarray(out.router.choice_LBT)
  np.testing.assert_array_equal(choices, ref_choices)
  assert (choices == TINY["num_experts"]).any()  # the skip slot was actually taken
  assert np.abs(np.asarray(out.logits_BTV) - ref_logits).max() <= 1e-5


def test_skip_bias_other_than_minus_one_is_kept_with_a_warning(reference_dir, tmp_path):
  def set_skip_bias(tensors):
    tensors["model.layers.1.mlp.gate.balancing_biases"][-1] = -3.0
  edited = corrupt(reference_dir[0], tmp_path / "edited", set_skip_bias)
  with pytest.warns(UserWarning, match="skip-slot balancing bias other than -1"):
    model = zaya_jax.load_hf(edited)
  assert float(flat_params(model)["model.layers.1.mlp.gate.balancing_biases"][...][-1]) == -3.0


def test_default_biases_keep_the_skip_slot_unreachable(reference_dir, recwarn):
  zaya_jax.load_hf(reference_dir[0])
  assert not [w for w in recwarn if "skip slot" in str(w.message)]


# -- inputs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", [TINY["vocab_size"], -1])
def test_out_of_vocabulary_ids_raise_before_jit(reference_dir, bad_id):
  model = zaya_jax.load_hf(reference_dir[0])
  ids = np.array([[1, 2, bad_id]])
  with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 96\)"):
    zaya_jax.forward(model, ids)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    model(ids)


def test_the_reference_default_skip_bias_ties_at_best_and_never_wins():
  # Expert probability + 0 against skip probability - 1: the skip slot's score reaches an expert's only in a tie.
  from zaya_jax.checkpoint.hf import skip_slot_reachable

  assert not skip_slot_reachable(np.array([0.0, 0.0, 0.0, -1.0]))
  assert skip_slot_reachable(np.array([0.0, 0.0, 0.0, -0.99]))


def test_a_bf16_export_stores_bf16_weights_and_fp32_biases(reference_dir, tmp_path):
  # load_hf would round fp32 weights to the config's bf16 anyway: only the file shows a skipped conversion.
  from safetensors import safe_open

  from zaya_jax.checkpoint.hf import BALANCING_SUFFIX

  zaya_jax.save_hf(zaya_jax.load_hf(reference_dir[0]), tmp_path / "bf16", dtype="bfloat16")
  with safe_open(tmp_path / "bf16" / "model.safetensors", "np") as f:
    codes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
  assert {c for k, c in codes.items() if not k.endswith(BALANCING_SUFFIX)} == {"BF16"}
  assert {c for k, c in codes.items() if k.endswith(BALANCING_SUFFIX)} == {"F32"}


def test_a_stale_copy_of_a_tensor_in_another_shard_is_refused(reference_dir, tmp_path):
  zaya_jax.save_hf(zaya_jax.load_hf(reference_dir[0]), tmp_path / "sharded", max_shard_bytes=4096)
  weight_map = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
  key = "model.norm.weight"
  other = next(f for f in sorted(set(weight_map.values())) if f != weight_map[key])
  tensors = load_file(tmp_path / "sharded" / other)
  tensors[key] = np.zeros(TINY["hidden_size"], np.float32)  # a copy the index does not place in this file
  save_file(tensors, tmp_path / "sharded" / other, metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=rf"{other}: tensor 'model.norm.weight' is not listed for this file"):
    zaya_jax.load_hf(tmp_path / "sharded")


def test_reference_state_is_float32_for_biases(reference_dir):
  _, ref = reference_dir
  assert ref.model.layers[0].mlp.gate.balancing_biases.dtype == torch.float32
