"""Markovian RSA driving the real model (a tiny random one): memory and programs do not grow with the rounds.

N population, C candidates per aggregation, T rounds, τ tail, β budget. The sampler's properties are tested with
scripted decoders in test_rsa.py; here `decode_fn` is `make_decode_fn` over a ZayaForCausalLM.
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from zaya_jax.config import ZayaConfig
from zaya_jax.infer import rsa
from zaya_jax.infer.generate import lower_generate, make_decode_fn
from zaya_jax.infer.sampling import SamplingConfig
from zaya_jax.model.decoder import ZayaForCausalLM

SAMPLING = SamplingConfig(temperature=1.0)
PIECES = rsa.PromptPieces(initial=((5, 6), (7,)), prefix=(8, 9), heads=((10, 11), (12,)), suffix=(13, 14))
CFG = rsa.RSAConfig(n=4, c=2, t=1, tau=3, beta=5, q_max=6, pad_id=0, self_continue=False)


@pytest.fixture(scope="module")
def model():
  return ZayaForCausalLM(ZayaConfig.tiny(vocab_size=64, num_layers=1), rngs=nnx.Rngs(0))


def test_rounds_reuse_the_same_programs_and_memory(model):
  bound = rsa.context_bound(CFG, PIECES)
  decode_fn = make_decode_fn(model, sampling=SAMPLING, max_len=bound)
  question = np.array([20, 21, 22])
  calls = {}
  for t in (1, 3):
    seen = []

    def recording(key, prompts, lens, max_new, seen=seen):
      seen.append((np.shape(prompts), max_new))
      return decode_fn(key, prompts, lens, max_new)

    state = rsa.run_loop(dataclasses.replace(CFG, t=t), PIECES, recording, question, jax.random.key(t))
    assert len(seen) == t + 1
    assert int(state.max_context) <= bound
    assert int(state.generated) == int(np.asarray(state.generated_R).sum()) > 0
    calls[t] = set(seen)
  # Every round of a longer run calls a program a shorter run compiled already (prompts of all rounds are padded to
  # one static capacity, so round 0 and the aggregations share it).
  assert calls[1] == calls[3] and len(calls[3]) <= 2
  memory = {}
  for shape, max_new in calls[3]:
    lowered = lower_generate(model, np.ones(shape, np.int32), np.ones(shape[:1], np.int32), key=jax.random.key(0),
                             max_new_tokens=max_new, sampling=SAMPLING, max_len=bound)
    stats = lowered.compile().memory_analysis()
    memory[shape] = stats.temp_size_in_bytes + stats.argument_size_in_bytes
  assert all(0 < m < 10 * 2**20 for m in memory.values()), memory


def test_single_jit_run_memory_is_flat_in_rounds_and_equals_the_host_loop(model):
  """`rsa.run` scans the aggregation rounds: its compiled temp memory is the same for T = 2 and T = 5. Run, the
  T = 2 program gives the state the host loop gives with the same model and key (scripted decoders show it in
  test_rsa.py; here the decoder is the real one, traced into the scan)."""
  decode_fn = make_decode_fn(model, sampling=SAMPLING, max_len=rsa.context_bound(CFG, PIECES))
  temp = {}
  for t in (2, 5):
    cfg = dataclasses.replace(CFG, t=t)
    q_Q, q_len = rsa._question(cfg, PIECES, [20, 21, 22])
    compiled = rsa._run_jit.lower(rsa._static(cfg), PIECES, decode_fn, decode_fn, jax.random.key(0), q_Q,
                                  q_len).compile()
    temp[t] = compiled.memory_analysis().temp_size_in_bytes
    if t == 2:
      in_one_jit = compiled(jax.random.key(7), q_Q, q_len)
      looped = rsa.run_loop(cfg, PIECES, decode_fn, [20, 21, 22], jax.random.key(7))
      for name, a, b in zip(looped._fields, in_one_jit, looped, strict=True):
        if name != "key":
          np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
      assert int(looped.generated) > 0
  # The population buffer [N, tail window] is the same for any T; only per-round counters ([T + 1] int32) grow.
  assert abs(temp[5] - temp[2]) <= 256, temp
