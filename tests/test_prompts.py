"""Aggregation prompts (zaya_jax.infer.prompts): host strings, chat rendering, and the device-spliced token prompt
equal, token for token, to tokenising the host string.

C candidates, T tail tokens (τ), L prompt capacity, N population. The tokenizer is a byte-level BPE (GPT-2 split
regex, as most LLM tokenizers) trained here on a few KB of text in about a second, with ChatML special tokens.
"""

import dataclasses
import datetime
import itertools
import json

import jax
import numpy as np
import pytest
from jinja2.exceptions import SecurityError, TemplateError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from zaya_jax.infer import prompts as P
from zaya_jax.infer import rsa

CHATML = (
  "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
CHAT = P.ChatFormat(CHATML, {"bos_token": "<|bos|>"})
QUESTION = "  What is 2+3? Show that $x^2 \\geq 0$ for every real {x}.  "
TAILS = [
  "We add 2 and 3 to get \\boxed{5}.",
  "Thus the answer is 6, since $\\frac{12}{2} = 6$.",
  "Let x = 2; then x^2 = 4, so \\boxed{4}.",
  "No idea {} at all",
]


@pytest.fixture(scope="module")
def tok():
  docs = [P.prompt_text(P.RSA_REFERENCE, QUESTION, TAILS[:2]), P.prompt_text(P.MARKOVIAN_ZAYA, QUESTION, TAILS[2:])]
  docs += [f"Step {i}: the sum of {i} and {i + 1} is {2 * i + 1}.\n\nSo \\boxed{{{2 * i + 1}}}.\n\n" for i in range(60)]
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=600,
    special_tokens=["<pad>", "<|bos|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(docs * 3, trainer)
  return tokenizer


def ids(tokenizer, text):
  return tokenizer.encode(text, add_special_tokens=False).ids


_build = jax.jit(rsa.build_aggregation_prompt, static_argnums=(0, 5, 6))
_build_initial = jax.jit(rsa.build_initial_prompt, static_argnums=(0, 3, 4))


def device_prompt(tokenizer, pieces, question, tails, q_max=64, tau=32):
  """The device splice of tokenised question and tails (as the sampler feeds them), cut at its length."""
  q = P.encode_question(tokenizer, question)
  q_Q = np.zeros(q_max, np.int32)
  q_Q[: len(q)] = q
  tails_CT = np.zeros((len(tails), tau), np.int32)
  for i, t in enumerate(tails):
    tails_CT[i, : len(ids(tokenizer, t))] = ids(tokenizer, t)
  lens_C = np.array([len(ids(tokenizer, t)) for t in tails], np.int32)
  capacity = pieces.template_len + q_max + len(tails) * tau
  out, length = _build(pieces, q_Q, np.int32(len(q)), tails_CT, lens_C, capacity, 0)
  out = np.asarray(out)
  assert (out[int(length) :] == 0).all()  # right-padded with pad_id
  return out[: int(length)].tolist()


@pytest.mark.parametrize(
  "template, c, chat",
  [
    (P.RSA_REFERENCE, 3, True),
    (P.RSA_REFERENCE, 1, True),
    (P.RSA_HARNESS, 4, False),
    (P.MARKOVIAN_ZAYA, 2, True),
    (P.MARKOVIAN_ZAYA, 1, False),
    (P.PACORE_ZAYA, 3, True),
    (P.DELETHINK, 1, True),
  ],
  ids=["rsa-c3-chat", "rsa-c1-chat", "harness-c4", "zaya-c2-chat", "zaya-c1", "pacore-c3-chat", "delethink-chat"],
)
def test_device_prompt_equals_tokenised_host_string(tok, template, c, chat):
  chat = CHAT if chat else None
  pieces = P.encode_pieces(tok, template, c, chat)
  tails = TAILS[:c]
  host = P.prompt_text(template, QUESTION, tails, chat)
  assert device_prompt(tok, pieces, QUESTION, tails) == ids(tok, host)
  assert tok.decode(ids(tok, host), skip_special_tokens=False) == host  # the host string round-trips
  # Round 0: the question alone as the user message.
  q = P.encode_question(tok, QUESTION)
  out, length = _build_initial(pieces, np.array(q + [0] * 4, np.int32), np.int32(len(q)), len(q) + 4 + 40, 0)
  assert np.asarray(out)[: int(length)].tolist() == ids(tok, P.prompt_text(template, QUESTION, None, chat))


def test_plain_prompts_start_as_the_tokenizer_starts_a_text(tok):
  """A Gemma-style post-processor puts <bos> before every encoded text: plain-text RSA prompts start with it, as
  `Tokenizer.encode` (and launch/generate.py) start a prompt; a rendered chat template brings its own, once."""
  with_bos = Tokenizer.from_str(tok.to_str())
  bos = tok.token_to_id("<|bos|>")
  with_bos.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
  assert P.leading_special_ids(with_bos) == (bos,) and P.leading_special_ids(tok) == ()
  pieces = P.encode_pieces(with_bos, P.RSA_REFERENCE, 2)
  host = P.prompt_text(P.RSA_REFERENCE, QUESTION, TAILS[:2])
  assert device_prompt(with_bos, pieces, QUESTION, TAILS[:2]) == with_bos.encode(host).ids
  q = P.encode_question(with_bos, QUESTION)
  out, length = _build_initial(pieces, np.array(q, np.int32), np.int32(len(q)), len(q) + 8, 0)
  assert np.asarray(out)[: int(length)].tolist() == with_bos.encode(P.prompt_text(P.RSA_REFERENCE, QUESTION, None)).ids
  chat_pieces = P.encode_pieces(with_bos, P.RSA_REFERENCE, 2, CHAT)
  assert chat_pieces.prefix == P.encode_pieces(tok, P.RSA_REFERENCE, 2, CHAT).prefix
  assert chat_pieces.prefix.count(bos) == 1


def test_pieces_are_tokenised_in_context(tok):
  """Why pieces are tokenised between probe texts: alone, the prefix's final blank line is one token; before the
  question it is two. Concatenating isolated pieces would not equal the host string."""
  assert tok.encode("Problem:\n\n").tokens[-1] == "ĊĊ"
  assert tok.encode("Problem:\n\nWhat").tokens[-3:] == ["Ċ", "Ċ", "What"]
  pieces = P.encode_pieces(tok, P.RSA_REFERENCE, 2)
  text = P.prompt_text(P.RSA_REFERENCE, "⟦Q⟧", ["⟦T0⟧", "⟦T1⟧"])
  prefix_text = text.split("⟦Q⟧")[0]
  assert ids(tok, prefix_text) != list(pieces.prefix)
  assert list(pieces.prefix) == ids(tok, prefix_text + "What")[:-1]


def test_sampler_prompts_equal_host_strings(tok):
  """Through the sampler itself: a population whose outputs are the tail texts, one aggregation round's prompts.
  Each prompt must be the tokenised host prompt of some ordered choice of C distinct population members."""
  cfg = rsa.RSAConfig(n=4, c=3, t=1, tau=32, beta=32, q_max=64)
  pieces = P.encode_pieces(tok, P.MARKOVIAN_ZAYA, cfg.c, CHAT)
  pool = np.zeros((cfg.n, cfg.beta), np.int32)
  for i, t in enumerate(TAILS):
    pool[i, : len(ids(tok, t))] = ids(tok, t)
  lens = np.array([len(ids(tok, t)) for t in TAILS])
  state = rsa.state_from_population(cfg, jax.random.key(0), pool, lens)
  q = P.encode_question(tok, QUESTION)
  q_Q = np.zeros(cfg.q_max, np.int32)
  q_Q[: len(q)] = q
  _, prompts_NL, plen_N = jax.jit(rsa.prepare_aggregation, static_argnums=(0, 1))(cfg, pieces, state, q_Q, len(q))
  hosts = {
    tuple(ids(tok, P.prompt_text(P.MARKOVIAN_ZAYA, QUESTION, [TAILS[i] for i in order], CHAT))): order
    for order in itertools.permutations(range(cfg.n), cfg.c)
  }
  orders = [hosts.get(tuple(np.asarray(prompts_NL[i, : plen_N[i]]).tolist())) for i in range(cfg.n)]
  assert None not in orders
  assert int(plen_N.max()) <= pieces.template_len + len(q) + cfg.c * cfg.tau


def test_a_piece_that_merges_with_its_neighbour_is_spliced_as_its_own_ids_with_a_warning(tok):
  bad = dataclasses.replace(P.RSA_REFERENCE, solution="Solution {i}: ")  # " " + tail start: one pre-token
  with pytest.warns(UserWarning) as caught:  # heads[0] and heads[1]: each "Solution i: " meets a tail
    pieces = P.encode_pieces(tok, bad, 2)
  assert any("piece heads[0]" in str(w.message) for w in caught)
  host = P.prompt_text(bad, QUESTION, TAILS[:2])
  spliced = device_prompt(tok, pieces, QUESTION, TAILS[:2])
  assert tok.decode(spliced, skip_special_tokens=False) == host  # the same text, whatever ids meet at the boundary
  with pytest.raises(ValueError, match="continuation"):
    P.encode_pieces(tok, P.DELETHINK, 2)


def test_a_tokenizer_that_merges_across_whitespace_still_splices_the_host_text():
  """A SentencePiece-style BPE (spaces as ▁, no pre-tokenizer split, as Gemma's family is built) may merge a
  template's first characters with the question's last ("?\n") or its last with a tail's first: such pieces cannot
  be tokenised independently of their neighbours. The sampler then splices their own ids (a warning says so), and
  the prompt is still the host string's text."""
  from tokenizers import normalizers

  docs = []
  for i in range(150):
    docs.append(f"Is {i} prime?\nCandidate solutions (may contain mistakes):\n---- Solution 1 ----\nWe check {i}.\n\n")
    docs.append(P.prompt_text(P.RSA_REFERENCE, f"What is {i}+{i}?", [f"so {2 * i}.", f"maybe {i}?"]))
  sp = Tokenizer(models.BPE())
  sp.normalizer = normalizers.Replace(" ", "\u2581")
  sp.decoder = decoders.Replace("\u2581", " ")
  alphabet = sorted(set("".join(docs).replace(" ", "\u2581")))
  sp.train_from_iterator(docs * 3, trainers.BpeTrainer(vocab_size=800, special_tokens=["<pad>"],
                                                       initial_alphabet=alphabet, show_progress=False))
  with pytest.warns(UserWarning, match="merges across its boundary"):
    pieces = P.encode_pieces(sp, P.RSA_REFERENCE, 2)
  for question, tails in (("Is 7 prime?", ["We check 7.", "so 14."]), ("What is 3+3.", ["maybe 3?", "so 6."])):
    host = P.prompt_text(P.RSA_REFERENCE, question, tails)
    assert sp.decode(device_prompt(sp, pieces, question, tails)) == host


def test_reference_wording_and_literal_braces():
  text = P.RSA_REFERENCE.user_text("Find {x}.", ["A \\boxed{1}", "B {}"])
  assert text == (
    "You are given a math problem and several candidate solutions. Some candidates may be incorrect or contain "
    "errors. Aggregate the useful ideas and produce a single, high-quality solution. Reason carefully; if candidates "
    "disagree, choose the correct path. If all are incorrect, then attempt a different strategy.End with the final "
    "result in \\boxed{}.\n\nProblem:\n\nFind {x}.\n\nCandidate solutions (may contain mistakes):\n\n"
    "---- Solution 1 ----\nA \\boxed{1}\n\n---- Solution 2 ----\nB {}\n\nNow write a single improved solution. "
    "Provide clear reasoning and end with the final answer in \\boxed{}."
  )
  assert "strategy. End" in P.RSA_HARNESS.intro and "strategy.End" not in P.RSA_HARNESS.intro
  single = P.MARKOVIAN_ZAYA.user_text("q", ["t"])
  assert "---- Candidate ----\nt\n" in single and "Solution 1" not in single and "a candidate solution" in single
  assert P.prompt_text(P.DELETHINK, " q ", ["tail"], CHAT).endswith("<think>\ntail")
  # Zyphra's proxy in PaCoRe mode: "\n".join of its parts, "Reference {i} " with its trailing space.
  assert P.PACORE_ZAYA.user_text("Q?", ["a", "b"]) == (
    "You are given a problem and a list of reference responses. Your job is to analyze these references and provide "
    "your own response. End with the final result in \\boxed{}.\n\nOriginal Problem:\n\nQ?\n\nReference Responses:\n\n"
    "Reference 1 \na\n\nReference 2 \nb\n\nNow write a single improved solution. Provide clear reasoning and end with "
    "the final answer in \\boxed{}."
  )
  assert "Reference 1 \nt\n" in P.PACORE_ZAYA.user_text("q", ["t"])


def test_render_chat_environment():
  # trim_blocks drops the newline after a block tag, lstrip_blocks the indent before one.
  loop = "{% for m in messages %}\n  {{ m.content }}\n  {% endfor %}"
  assert P.render_chat(loop, [{"content": "a"}, {"content": "b"}]) == "  a\n  b\n"
  one = [{"role": "user", "content": "é"}]
  assert P.render_chat("{{ messages | tojson }}", one) == '[{"role": "user", "content": "é"}]'
  msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
  assert P.render_chat(CHATML, msgs, add_generation_prompt=False, bos_token="B") == (
    "B<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n"
  )
  with pytest.raises(TemplateError, match="only user"):
    P.render_chat("{{ raise_exception('only user turns') }}", msgs)
  with pytest.raises(SecurityError):
    P.render_chat("{{ ''.__class__.__mro__ }}", msgs)
  with pytest.raises(SecurityError):
    P.render_chat("{% set xs = [1] %}{{ xs.append(2) }}", msgs)  # immutable sandbox


def test_load_chat_template(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"chat_template": CHATML, "bos_token": {"content": "<|bos|>"}, "eos_token": "<|im_end|>"})
  )
  chat = P.load_chat_template(tmp_path)
  assert chat.template == CHATML and chat.extra["bos_token"] == "<|bos|>"
  assert chat.user("hi") == "<|bos|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
  named = tmp_path / "named.json"
  templates = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
  named.write_text(json.dumps({"chat_template": templates}))
  assert P.load_chat_template(named).template == "D" and P.load_chat_template(named, "tool_use").template == "T"
  with pytest.raises(ValueError, match="no chat template named 'rag'"):
    P.load_chat_template(named, "rag")
  (tmp_path / "chat_template.jinja").write_text("J{{ messages[0].content }}")
  assert P.load_chat_template(tmp_path).user("x") == "Jx"  # the separate file wins, as in transformers
  empty = tmp_path / "empty.json"
  empty.write_text("{}")
  with pytest.raises(ValueError, match="no chat_template"):
    P.load_chat_template(empty)


@pytest.mark.parametrize("with_added_tokens", [False, True])
def test_chat_template_names_come_from_where_transformers_takes_them(tmp_path, tok, with_added_tokens):
  """An older folder keeps bos/eos in special_tokens_map.json; transformers merges it over tokenizer_config.json
  unless the config lists added_tokens_decoder. The rendered prompt must be the one transformers renders."""
  from transformers import AutoTokenizer

  tok.save(str(tmp_path / "tokenizer.json"))
  config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}
  if with_added_tokens:
    config["added_tokens_decoder"] = {"0": {"content": "<pad>", "special": True, "lstrip": False, "rstrip": False,
                                            "normalized": False, "single_word": False}}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<|bos|>"},
                                                                "eos_token": "<pad>"}))
  messages = [{"role": "user", "content": "What is 2+3?"}]
  expected = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)
  assert P.load_chat_template(tmp_path).user(messages[0]["content"]) == expected
  assert expected.startswith("<|im_start|>" if with_added_tokens else "<|bos|><|im_start|>")


def test_single_candidate_wording_is_data():
  # The reference wording (documented in prompts.py) is data: a change to it is a change to the method's prompts.
  assert P.MARKOVIAN_ZAYA.user_text("q", ["t"]) == (
    P.RSA_REFERENCE.intro_single + "\n[[ Problem ]]:\n\nq\n\n[[ Candidate solutions (may contain mistakes) ]]\n\n"
    "---- Candidate ----\nt\n\nNow, based on the original problem and the reference response above, please provide "
    "your own comprehensive solution.")
  single = P.RSA_REFERENCE.user_text("q", ["t"])
  assert single.endswith("Now refine the candidate into an improved solution. Provide clear reasoning and end with the "
                         "final answer in \\boxed{}.")
  assert "Candidate solution (may contain mistakes):\n" in single


def test_chat_environment_has_loop_controls_and_strftime_now():
  # transformers renders chat templates with these, and real templates use them.
  msgs = [{"role": "user", "content": c} for c in "abc"]
  assert P.render_chat("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.content }}"
                       "{% endfor %}", msgs) == "ab"
  assert P.render_chat("{% for m in messages %}{% if m.content == 'b' %}{% continue %}{% endif %}{{ m.content }}"
                       "{% endfor %}", msgs) == "ac"
  year = P.render_chat("{{ strftime_now('%Y') }}", msgs)
  assert year in {str(datetime.date.today().year), str(datetime.date.today().year - 1)}
