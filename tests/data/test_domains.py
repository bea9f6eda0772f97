"""The `domains` source: built-in and user domains, the weighted mixture, domain ids, config errors."""

import math
import re

import numpy as np
import pytest
from ml_collections import ConfigDict

from jaxlab.data import DomainMixture, PackedWindows, check_data_config, make_sources, train_dataset
from jaxlab.data.domains import domain_documents

MAX_BYTES = 20_000


def _data(**overrides):
  data = ConfigDict(dict(
      source="domains", paths=(), tokenizer="bytes", seq_len=32, batch_size=8, val_fraction=0.1,
      domains=dict(python_docs="builtin", python_stdlib="builtin", arithmetic="builtin"),
      domain_weights=dict(), domain_max_bytes=MAX_BYTES,
      arithmetic=dict(min_digits=1, max_digits=5, num_problems=1_000),
  ))
  for key, value in overrides.items():
    data[key] = value  # replaces a section, where `update` would merge into it
  return data


def _text(name, data=None):
  data = data or _data()
  return "".join(domain_documents(name, data.domains[name], data, seed=0))


def test_builtin_domains_are_real_and_distinct():
  docs, stdlib, arithmetic = (_text(name) for name in ("python_docs", "python_stdlib", "arithmetic"))
  assert len(docs.encode()) == len(stdlib.encode()) == MAX_BYTES  # capped to comparable sizes
  assert "def " in stdlib and "import" in stdlib and stdlib.count("\n    ") > 100
  assert "statement" in docs and len(re.findall(r"\b(the|is|of)\b", docs)) > 300
  assert docs.count("def ") < stdlib.count("def ") / 5
  lines = arithmetic.splitlines()
  assert len(lines) == 1_000
  lengths = set()
  for line in lines:
    a, b, c = re.fullmatch(r"(\d+)\+(\d+)=(\d+)", line).groups()
    assert int(a[::-1]) + int(b[::-1]) == int(c[::-1])  # least significant digit first
    lengths.update((len(a), len(b)))
  assert lengths == set(range(1, 6))


def _windows(first_token, n, seq_len=4):
  return PackedWindows(np.arange(first_token, first_token + n * seq_len + 1, dtype=np.int32), seq_len)


def test_mixture_ids_and_proportions_follow_the_rule():
  sizes, weights = (31, 10, 50, 7), (3.0, 2.0, 0.0, 1.0)
  sources = [_windows(1000 * d, n) for d, n in enumerate(sizes)]
  mixture = DomainMixture(sources, weights)
  most = max(n / (w / 6) for n, w in zip(sizes, weights) if w)  # 62 (domain 0)
  counts = [math.ceil(most * w / 6) for w in weights]  # 62 * (3, 2, 0, 1) / 6, rounded up
  assert counts == [31, 21, 0, 11] and len(mixture) == 63
  records = [mixture[i] for i in range(len(mixture))]
  ids = np.array([r["domain"] for r in records])
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ids, minlength=4), counts)
  for d, source in enumerate(sources):
    seen = {int(r["inputs"][0]) for r in records if r["domain"] == d}
    assert seen == ({int(source[j]["inputs"][0]) for j in range(len(source))} if weights[d] else set())
  concat = DomainMixture(sources, [len(s) for s in sources])
  np.testing.assert_array_equal(np.concatenate([concat[i]["inputs"] for i in range(len(concat))]),
                                np.concatenate([s[j]["inputs"] for s in sources for j in range(len(s))]))


@pytest.fixture(scope="module")
def sources():
  return make_sources(_data(domain_weights=dict(python_docs=1.0, python_stdlib=1.0, arithmetic=2.0)), seed=0)


def _window_set(windows):
  return {windows[j]["inputs"].tobytes() for j in range(len(windows))}


def test_every_record_carries_the_domain_its_tokens_came_from(sources):
  names = list(sources.domains)
  assert names == ["arithmetic", "python_docs", "python_stdlib"]  # ids: sorted names
  for mixture, split in ((sources.train, "train"), (sources.validation, "validation")):
    owned = [_window_set(getattr(sources.domains[n], split)) for n in names]
    ids = []
    for i in range(len(mixture)):
      record = mixture[i]
      ids.append(int(record["domain"]))
      assert [record["inputs"].tobytes() in w for w in owned] == [d == ids[-1] for d in range(3)]
    assert set(ids) == {0, 1, 2}
  first_batch = [int(sources.validation[i]["domain"]) for i in range(8)]
  assert sorted(first_batch) == [0, 0, 1, 1, 1, 2, 2, 2]  # in proportion: 8 x (40, 62, 62) / 164
  assert len(_window_set(sources.validation)) == len(sources.validation)  # each window once
  shares = np.bincount([int(sources.train[i]["domain"]) for i in range(len(sources.train))]) / len(sources.train)
  np.testing.assert_allclose(shares, [0.5, 0.25, 0.25], atol=1e-3)
  assert len(sources.validation) == sum(len(d.validation) for d in sources.domains.values())


def test_sources_are_deterministic(sources):
  again = make_sources(_data(domain_weights=dict(python_docs=1.0, python_stdlib=1.0, arithmetic=2.0)), seed=0)
  assert len(again.train) == len(sources.train)
  for i in range(0, len(sources.train), 97):
    for key, value in sources.train[i].items():
      np.testing.assert_array_equal(again.train[i][key], value)
  assert _text("arithmetic") != "".join(domain_documents("arithmetic", "builtin", _data(), seed=1))


def test_train_dataset_mixes_the_domains(sources):
  it = iter(train_dataset(sources.train, 8, seed=0, process=(0, 1)))
  batches = [next(it) for _ in range(len(sources.train) // 8)]
  assert batches[0]["inputs"].shape == (8, 32) and batches[0]["domain"].shape == (8,)
  ids = np.concatenate([b["domain"] for b in batches])
  np.testing.assert_allclose(np.bincount(ids) / len(ids), [0.5, 0.25, 0.25], atol=0.01)
  assert len(set(batches[0]["domain"].tolist())) > 1  # shuffled across domain blocks
  again = iter(train_dataset(sources.train, 8, seed=0, process=(0, 1)))
  np.testing.assert_array_equal(next(again)["domain"], batches[0]["domain"])


def test_a_user_glob_domain(tmp_path):
  (tmp_path / "a.txt").write_text("notes on a user domain " * 40)
  (tmp_path / "b.txt").write_text("more notes " * 40)
  data = _data(domains=dict(notes=str(tmp_path / "*.txt"), arithmetic="builtin"))
  check_data_config(data)
  sources = make_sources(data, seed=0)
  assert list(sources.domains) == ["arithmetic", "notes"]
  notes = sources.domains["notes"]
  assert sources.tokenizer.decode(notes.train[0]["inputs"]) == "notes on a user domain notes on "
  record = next(sources.train[i] for i in range(len(sources.train)) if sources.train[i]["domain"] == 1)
  assert "notes" in sources.tokenizer.decode(record["inputs"])


@pytest.mark.parametrize("overrides, field", [
    (dict(domains=dict(python_docs="builtin", wikipedia="builtin")), r"data\.domains\.wikipedia='builtin'"),
    (dict(domain_weights=dict(python_docs=1.0, arithmetic=1.0)), r"data\.domain_weights=.*every domain"),
    (dict(domain_weights=dict(python_docs=1.0, python_stdlib=-1.0, arithmetic=1.0)),
     r"data\.domain_weights\.python_stdlib=-1\.0"),
    (dict(domain_weights=dict(python_docs=0.0, python_stdlib=0.0, arithmetic=0.0)), r"are all 0"),
    (dict(arithmetic=dict(min_digits=4, max_digits=2, num_problems=10)), r"data\.arithmetic\.min_digits=4"),
])
def test_config_errors_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    check_data_config(_data(**overrides))


def test_a_glob_matching_nothing_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"data\.domains\.mine=.*matches no file"):
    check_data_config(_data(domains=dict(mine=str(tmp_path / "*.md"))))
