"""Inference: cached decoding with static-shape states, sampling, and batched generation in one jitted loop."""

from zaya_jax.infer.decode import DecodeState, decode_step, init_state, prefill
from zaya_jax.infer.generate import GenerateOutput, generate, lower_generate, make_decode_fn, pad_id
from zaya_jax.infer.sampling import GREEDY, SamplingConfig, filter_logits, sample

__all__ = ["GREEDY", "DecodeState", "GenerateOutput", "SamplingConfig", "decode_step", "filter_logits", "generate",
           "init_state", "lower_generate", "make_decode_fn", "pad_id", "prefill", "sample"]

from zaya_jax.infer.answers import (
  Vote,
  extract_boxed,
  is_equiv,
  majority_at_n,
  majority_vote,
  mean_correct,
  normalize_answer,
  pass_at_n,
)
from zaya_jax.infer.prompts import (
  DELETHINK,
  MARKOVIAN_ZAYA,
  RSA_HARNESS,
  RSA_REFERENCE,
  AggregationTemplate,
  ChatFormat,
  encode_pieces,
  encode_question,
  load_chat_template,
  prompt_text,
  render_chat,
)
from zaya_jax.infer.rsa import PromptPieces, RSAConfig, RSAState, context_bound, prompt_capacity, run, run_loop

__all__ += [
  "DELETHINK",
  "MARKOVIAN_ZAYA",
  "RSA_HARNESS",
  "RSA_REFERENCE",
  "AggregationTemplate",
  "ChatFormat",
  "PromptPieces",
  "RSAConfig",
  "RSAState",
  "Vote",
  "context_bound",
  "encode_pieces",
  "encode_question",
  "extract_boxed",
  "is_equiv",
  "load_chat_template",
  "majority_at_n",
  "majority_vote",
  "mean_correct",
  "normalize_answer",
  "pass_at_n",
  "prompt_capacity",
  "prompt_text",
  "render_chat",
  "run",
  "run_loop",
]
