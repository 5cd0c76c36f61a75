"""Reading and encoding text corpora (zaya_jax.train.text_corpus): which files become which documents, and what a
document's ids are. The training and pretokenizing paths both read through it; test_data.py and
test_token_shards.py check them end to end."""

import gzip

import pytest

from zaya_jax import host_memory
from zaya_jax.tokenizer import train_bpe
from zaya_jax.train import text_corpus
from zaya_jax.train.text_corpus import encode_chunks, encode_documents, glob_root, text_documents


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return train_bpe(["alpha beta gamma delta " * 50], 280, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def _names(paths, doc_separator=None):
  return [name for name, _ in text_documents([str(p) for p in paths], doc_separator)]


def test_which_files_become_documents(tmp_path):
  corpus = tmp_path / "corpus"
  (corpus / "sub").mkdir(parents=True)
  (corpus / ".git").mkdir()
  (corpus / "a.txt").write_text("a")
  (corpus / "sub" / "b.txt").write_text("b")
  (corpus / ".hidden.txt").write_text("h")  # hidden files and folders are not corpus text
  (corpus / ".git" / "config").write_text("g")
  assert _names([corpus]) == ["corpus/a.txt", "corpus/sub/b.txt"]
  # A file reached through two paths is read once, where it is first reached.
  assert _names([corpus / "*.txt", corpus]) == ["a.txt", "corpus/sub/b.txt"]
  # Names are relative to the glob's own folder, however deep (they key the held-out split).
  assert glob_root(str(corpus / "sub" / "*.txt")) == str(corpus / "sub")
  assert _names([corpus / "sub" / "*.txt"]) == ["b.txt"]


def test_separator_pieces_of_only_whitespace_are_not_documents(tmp_path):
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "x.txt").write_text("one\n\n   \n\ntwo")
  assert _names([tmp_path / "c"], "\n\n") == ["c/x.txt#0", "c/x.txt#2"]
  (tmp_path / "blank").mkdir()
  (tmp_path / "blank" / "y.txt").write_text("\n\n \n\n")
  with pytest.raises(ValueError, match="no text"):
    text_documents([str(tmp_path / "blank")], "\n\n")


def test_array_records_and_cut_archives_in_a_text_folder_are_named(tmp_path):
  (tmp_path / "ids").mkdir()
  (tmp_path / "ids" / "x.arrayrecord").write_bytes(b"\0\1")  # the other spelling of the suffix
  (tmp_path / "ids" / "a.txt").write_text("a")
  with pytest.raises(ValueError, match="holds ArrayRecord files"):
    text_documents([str(tmp_path / "ids")])
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "cut.txt.gz").write_bytes(gzip.compress(b"hello " * 500)[:-10])  # a download cut short
  with pytest.raises(ValueError, match=r"cut.txt.gz is not a readable gzip file"):
    text_documents([str(tmp_path / "c")])


def test_the_memory_check_counts_utf8_bytes(monkeypatch):
  # 400 two-byte characters: 800 bytes of UTF-8 text to encode, one byte more than the memory allows.
  monkeypatch.setattr(text_corpus, "ENCODE_CHUNK_CHARS", 300)
  monkeypatch.setattr(host_memory, "available_memory", lambda: 800 * text_corpus.ENCODE_BYTES_PER_TEXT_BYTE - 1)
  with pytest.raises(ValueError, match=r"document d holds 800 bytes"):
    list(encode_chunks([("d", "é" * 400)]))


def test_document_ids_end_in_one_eos_and_one_token_documents_are_kept(tok):
  assert len(tok.encode("alpha")) == 1
  ids, offsets, _ = encode_documents(tok, [("d", "alpha")])
  assert offsets.tolist() == [0, 2] and ids.tolist() == [*tok.encode("alpha"), tok.eos_id]
  # A chat-formatted document that already ends in the eos token gets no second one.
  ids, _, _ = encode_documents(tok, [("d", "alpha<eos>")], special_tokens_in_text=True)
  assert ids.tolist() == [*tok.encode("alpha"), tok.eos_id]
