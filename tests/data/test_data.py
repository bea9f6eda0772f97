"""Corpora, tokenizers, packing, deterministic shuffling, host shards, MQAR."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from jaxlab.data import (
    MQAR, ByteTokenizer, PackedWindows, eval_batches, make_sources, split_stream, train_dataset,
)
from jaxlab.data import corpora


def test_bundled_corpus_is_real_text_on_this_machine():
  docs = corpora.python_docs()
  text = "".join(docs)
  assert len(docs) > 50 and len(text) > 300_000
  assert "assert" in text and "statement" in text


def test_byte_tokenizer_round_trip_and_eos():
  tok = ByteTokenizer()
  text = "héllo, wörld ✓"
  np.testing.assert_array_equal(tok.encode(text), np.frombuffer(text.encode(), np.uint8))
  assert tok.decode(tok.encode(text)) == text
  stream = corpora.tokenize_documents(["ab", "c"], tok)
  np.testing.assert_array_equal(stream, [97, 98, 256, 99, 256])


def test_packed_windows_are_shifted_and_consecutive():
  tokens = np.arange(100, dtype=np.int32)
  windows = PackedWindows(tokens, seq_len=16)
  assert len(windows) == 6
  r = windows[2]
  np.testing.assert_array_equal(r["inputs"], np.arange(32, 48))
  np.testing.assert_array_equal(r["targets"], np.arange(33, 49))
  np.testing.assert_array_equal(r["weights"], np.ones(16))


def test_split_keeps_the_stream_order():
  train, val = split_stream(np.arange(100), 0.1)
  np.testing.assert_array_equal(np.concatenate([train, val]), np.arange(100))
  assert len(val) == 10


def _windows(n=50, seq_len=4):
  return PackedWindows(np.arange(n * seq_len + 1, dtype=np.int32), seq_len)


def _first_column(batches):
  return [tuple(b["inputs"][:, 0] // 4) for b in batches]  # record ids


def test_shuffle_is_deterministic_and_covers_each_epoch():
  source = _windows()
  it = iter(train_dataset(source, 10, seed=3, process=(0, 1)))
  epoch = [next(it) for _ in range(5)]
  ids = sorted(i for batch in _first_column(epoch) for i in batch)
  assert ids == list(range(50))  # every record exactly once per epoch
  again = iter(train_dataset(source, 10, seed=3, process=(0, 1)))
  assert _first_column([next(again) for _ in range(5)]) == _first_column(epoch)
  next_epoch = _first_column([next(it) for _ in range(5)])
  assert next_epoch != _first_column(epoch)  # reshuffled
  other_seed = iter(train_dataset(source, 10, seed=4, process=(0, 1)))
  assert _first_column([next(other_seed) for _ in range(5)]) != _first_column(epoch)


def test_iterator_state_resumes_exactly():
  source = _windows()
  it = iter(train_dataset(source, 10, seed=1, process=(0, 1)))
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it)["inputs"] for _ in range(4)]
  resumed = iter(train_dataset(source, 10, seed=1, process=(0, 1)))
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["inputs"], want)


def test_hosts_read_disjoint_shares_of_the_same_global_batches():
  source = _windows()
  single = iter(train_dataset(source, 10, seed=2, process=(0, 1)))
  hosts = [iter(train_dataset(source, 10, seed=2, process=(p, 2))) for p in range(2)]
  for _ in range(8):
    whole = set(next(single)["inputs"][:, 0] // 4)
    parts = [set(next(h)["inputs"][:, 0] // 4) for h in hosts]
    assert all(len(p) == 5 for p in parts)
    assert parts[0].isdisjoint(parts[1])
    assert parts[0] | parts[1] == whole


def test_eval_batches_are_ordered_and_bounded():
  batches = list(eval_batches(_windows(), 10, max_batches=3, process=(0, 1)))
  assert len(batches) == 3
  assert _first_column(batches)[0] == tuple(range(10))
  halves = [list(eval_batches(_windows(), 10, 3, process=(p, 2))) for p in range(2)]
  assert all(b["inputs"].shape == (5, 4) for h in halves for b in h)


def test_batch_not_divisible_by_hosts_is_an_error():
  with pytest.raises(ValueError, match="data.batch_size=9"):
    next(iter(train_dataset(_windows(), 9, seed=0, process=(0, 2))))


def test_user_text_and_token_files(tmp_path):
  (tmp_path / "a.txt").write_text("first document " * 50)
  (tmp_path / "b.txt").write_text("second document " * 50)
  config = ConfigDict(dict(source="text", paths=[str(tmp_path / "*.txt")], tokenizer="bytes",
                           seq_len=16, val_fraction=0.2))
  sources = make_sources(config, seed=0)
  assert sources.vocab_size == 257 and len(sources.train) > 0 and len(sources.validation) > 0
  assert sources.tokenizer.decode(sources.train[0]["inputs"]) == "first document f"

  tokens = np.arange(1000) % 300
  np.save(tmp_path / "t.npy", tokens.astype(np.int32))
  tokens.astype(np.uint16).tofile(tmp_path / "t.bin")
  for name in ("t.npy", "t.bin"):
    config = ConfigDict(dict(source="tokens", paths=[str(tmp_path / name)], token_dtype="uint16",
                             seq_len=10, val_fraction=0.1))
    sources = make_sources(config, seed=0)
    assert sources.vocab_size == 300
    np.testing.assert_array_equal(sources.train[1]["inputs"], np.arange(10, 20))


def test_missing_files_are_named():
  config = ConfigDict(dict(source="text", paths=["/nonexistent/*.txt"], tokenizer="bytes",
                           seq_len=16, val_fraction=0.2))
  with pytest.raises(FileNotFoundError, match="/nonexistent"):
    make_sources(config, seed=0)


class TestMQAR:
  task = MQAR(vocab_size=128, seq_len=64, num_kv_pairs=8, num_examples=200, seed=0)

  def test_keys_values_and_labels(self):
    for i in range(20):
      r = self.task[i]
      x, y, w = r["inputs"], r["targets"], r["weights"]
      keys, values = x[0:16:2], x[1:16:2]
      assert len(set(keys)) == 8
      assert np.all((keys >= 1) & (keys < 64)) and np.all((values >= 64) & (values < 128))
      query_positions = np.flatnonzero(w)
      assert len(query_positions) == 8 and np.all(query_positions >= 16)
      kv = dict(zip(keys, values))
      for pos in query_positions:
        assert y[pos] == kv[x[pos]]  # the label at a query is its key's value

  def test_deterministic_per_index(self):
    a, b = self.task[5], MQAR(vocab_size=128, seq_len=64, num_kv_pairs=8, num_examples=200, seed=0)[5]
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(self.task[5]["inputs"], self.task[6]["inputs"])

  def test_query_gaps_follow_a_power_law(self):
    """Short gaps dominate: most queries land in the first quarter of the query region."""
    gaps = np.concatenate([(np.flatnonzero(self.task[i]["weights"]) - 16) // 2 for i in range(200)])
    space = (64 - 16) // 2
    assert np.mean(gaps < space // 4) > 0.4
    assert gaps.max() < space

  def test_without_random_fill_the_rest_is_zero(self):
    task = MQAR(vocab_size=128, seq_len=64, num_kv_pairs=8, num_examples=10, seed=0,
                random_non_queries=False)
    r = task[0]
    filled = np.zeros(64, bool)
    filled[:16] = True
    filled[np.flatnonzero(r["weights"])] = True
    assert np.all(r["inputs"][~filled] == 0)

  def test_impossible_settings(self):
    with pytest.raises(ValueError, match="seq_len >= 64"):
      MQAR(vocab_size=128, seq_len=48, num_kv_pairs=16, num_examples=1, seed=0)
    with pytest.raises(ValueError, match="num_kv_pairs=16 needs data.mqar.vocab_size >= 34"):
      MQAR(vocab_size=32, seq_len=64, num_kv_pairs=16, num_examples=1, seed=0)

  def test_vocabulary_smaller_than_the_sequence(self):
    """Zoology asserts vocab > seq_len; nothing needs it: keys stay unique in a longer sequence."""
    r = MQAR(vocab_size=64, seq_len=256, num_kv_pairs=30, num_examples=1, seed=3)[0]
    keys = r["inputs"][:60:2]
    assert len(set(keys.tolist())) == 30 and keys.min() >= 1 and keys.max() < 32
    values = r["targets"][r["weights"] > 0]
    assert sorted(values.tolist()) == sorted(r["inputs"][1:60:2].tolist())


def _decode_number(tokens):
  return int("".join(str(t) for t in reversed(list(tokens))))


class TestAddition:

  def test_problems_are_correct_reversed_sums(self):
    from jaxlab.data import Addition

    task = Addition(min_digits=1, max_digits=8, num_examples=50, seed=0)
    lengths = set()
    for i in range(50):
      r = task[i]
      sequence = np.concatenate([r["inputs"][:1], r["targets"]])
      plus = int(np.flatnonzero(sequence == Addition.PLUS)[0])
      equals = int(np.flatnonzero(sequence == Addition.EQUALS)[0])
      eos = int(np.flatnonzero(sequence == Addition.EOS)[0])
      a, b, c = (_decode_number(sequence[s:e]) for s, e in ((0, plus), (plus + 1, equals), (equals + 1, eos)))
      assert a + b == c
      lengths.update((plus, equals - plus - 1))
      # weight exactly on the answer digits and the EOS, as targets
      np.testing.assert_array_equal(np.flatnonzero(r["weights"]), np.arange(equals, eos))
    assert lengths == set(range(1, 9))

  def test_fixed_length_test_problems(self):
    from jaxlab.data import Addition

    r = Addition(min_digits=12, max_digits=12, num_examples=1, seed=3)[0]
    assert r["inputs"].shape == (40,)
    assert int(np.flatnonzero(r["inputs"] == Addition.PLUS)[0]) == 12

  def test_operands_longer_than_int64_are_exact(self):
    from jaxlab.data import Addition

    task = Addition(min_digits=25, max_digits=25, num_examples=20, seed=1)
    for i in range(20):
      a, b = task.operands(i)
      assert len(str(a)) == len(str(b)) == 25
      sequence = np.concatenate([task[i]["inputs"][:1], task[i]["targets"]])
      equals, eos = (int(np.flatnonzero(sequence == token)[0]) for token in (Addition.EQUALS, Addition.EOS))
      assert _decode_number(sequence[equals + 1 : eos]) == a + b


class TestPasskey:

  def test_key_is_asked_for_at_the_end(self):
    from jaxlab.data import Passkey

    task = Passkey(min_len=24, max_len=64, num_examples=20, seed=0)
    for i in range(20):
      r = task[i]
      x, y, w = r["inputs"], r["targets"], r["weights"]
      key_at = int(np.flatnonzero(x == Passkey.KEY)[0])
      key = x[key_at + 1 : key_at + 6]
      query_at = int(np.flatnonzero(x == Passkey.QUERY)[0])
      answer = np.flatnonzero(w)
      np.testing.assert_array_equal(answer, np.arange(query_at, query_at + 6))
      np.testing.assert_array_equal(y[answer], [*key, Passkey.EOS])
      assert 24 <= query_at + 6 <= 64 and np.all(x[:key_at] >= Passkey.FILLER)
