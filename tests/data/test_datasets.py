"""Embedding cache, file readers, named sources and the datasets.  A fake encoder (deterministic, counts its
calls) keeps most tests fast; the real default teacher is used where the texts' meaning matters."""

import json
import os
import pickle
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FakeEncoder

from cubecore import (AutoencoderDataset, DataConfig, DialogueDataset, EmbeddingCache,
                      create_dialogue_dataset, create_file_dataset, create_text_dataset)
from cubecore import train as train_cli
from cubecore.errors import CubecoreError, UnknownKeyError
from cubecore.data import conversations_to_pairs, filter_pairs, load_conversations, read_dialogue, split_indices
from cubecore.data.readers import read_embeddings




TEXTS = [f"text number {i}" for i in range(40)]


# --- cache -----------------------------------------------------------------------------------------------------


def test_second_run_is_served_from_the_cache(tmp_path):
    enc = FakeEncoder()
    a = create_text_dataset(TEXTS, encoder=enc, cache_dir=str(tmp_path))
    b = create_text_dataset(TEXTS, encoder=enc, cache_dir=str(tmp_path))
    assert enc.calls == 1
    assert torch.equal(a.inputs, b.inputs)
    assert not list(tmp_path.glob("*.tmp")), "no temporary files left behind"


def test_cache_key_changes_with_model_and_texts(tmp_path):
    cache = EmbeddingCache(tmp_path)
    a = cache.path_for(FakeEncoder(name="a").fingerprint(), TEXTS)
    assert a != cache.path_for(FakeEncoder(name="b").fingerprint(), TEXTS)
    assert a != cache.path_for(FakeEncoder(name="a").fingerprint(), TEXTS[:-1])
    # Two texts joined differently must not collide.
    assert cache.path_for({"m": 1}, ["ab", "c"]) != cache.path_for({"m": 1}, ["a", "bc"])
    enc_a, enc_b = FakeEncoder(name="a"), FakeEncoder(name="b")
    create_text_dataset(TEXTS, encoder=enc_a, cache_dir=str(tmp_path))
    create_text_dataset(TEXTS, encoder=enc_b, cache_dir=str(tmp_path))
    assert enc_b.calls == 1, "another model's embeddings were served"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "tamper"])
def test_corrupt_cache_is_reported_and_rebuilt(tmp_path, damage):
    enc = FakeEncoder()
    first = create_text_dataset(TEXTS, encoder=enc, cache_dir=str(tmp_path)).inputs
    (path,) = list(tmp_path.glob("*.pt"))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file")
    else:
        entry = torch.load(path, weights_only=True)
        entry["embeddings"][0, 0] += 1.0
        torch.save(entry, path)
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        again = create_text_dataset(TEXTS, encoder=enc, cache_dir=str(tmp_path)).inputs
    assert enc.calls == 2
    assert torch.equal(first, again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_text_dataset(TEXTS, encoder=enc, cache_dir=str(tmp_path))
    assert enc.calls == 2


def test_unwritable_cache_dir_warns_and_the_run_goes_on(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    cache_dir = tmp_path / "a_file" / "cache"  # cannot be created: even root cannot write here
    enc = FakeEncoder()
    with pytest.warns(RuntimeWarning, match="cannot write") as record:
        ds = create_text_dataset(TEXTS, encoder=enc, cache_dir=str(cache_dir))
    message = str(record[0].message)
    assert str(cache_dir) in message and "without the cache" in message
    assert "Error" in message, "the reason is given"
    expected = torch.nn.functional.normalize(enc.encode(TEXTS), dim=-1)
    assert torch.allclose(ds.inputs, expected)
    with pytest.warns(RuntimeWarning, match="cannot write"):
        create_text_dataset(TEXTS, encoder=enc, cache_dir=str(cache_dir))
    assert enc.calls == 3  # (one of them above, by the test) nothing was cached


def test_unreadable_cache_dir_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    from pathlib import Path

    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    real_is_file = Path.is_file

    def is_file(self):  # what a directory without search permission does (root ignores permissions)
        if cache_dir in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    enc = FakeEncoder()
    with pytest.warns(RuntimeWarning, match="cannot read") as record:
        ds = create_text_dataset(TEXTS, encoder=enc, cache_dir=str(cache_dir))
    assert str(cache_dir) in str(record[0].message) and "PermissionError" in str(record[0].message)
    assert enc.calls == 1 and len(ds) + len(ds.validation) == len(TEXTS)
    assert list(cache_dir.iterdir()) == []


def test_unreadable_cache_file_is_reported_and_kept(tmp_path, monkeypatch):
    from pathlib import Path

    enc = FakeEncoder()
    first = create_text_dataset(TEXTS, encoder=enc, cache_dir=str(tmp_path)).inputs
    (path,) = list(tmp_path.glob("*.pt"))
    real_open = Path.open

    def open_(self, *args, **kwargs):  # what a file without read permission does (root ignores permissions)
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    with pytest.warns(RuntimeWarning, match="cannot read"):
        again = create_text_dataset(TEXTS, encoder=enc, cache_dir=str(tmp_path)).inputs
    assert enc.calls == 2 and torch.equal(first, again)
    assert path.is_file(), "a file that merely cannot be read is not deleted"


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_cache_files_respect_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        create_text_dataset(TEXTS, encoder=FakeEncoder(), cache_dir=str(tmp_path))
    finally:
        os.umask(old)
    (path,) = list(tmp_path.glob("*.pt"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o664


def test_default_cache_dir_is_a_user_cache(monkeypatch, tmp_path):
    from cubecore.data import default_cache_dir

    monkeypatch.delenv("CUBECORE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "cubecore" / "embeddings"
    monkeypatch.setenv("CUBECORE_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


# --- splits and processing -------------------------------------------------------------------------------------


def test_fixed_seed_split_is_stable_and_disjoint():
    a_train, a_val = split_indices(100, 0.2, True, seed=7)
    b_train, b_val = split_indices(100, 0.2, True, seed=7)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert len(a_val) == 20 and not set(a_train.tolist()) & set(a_val.tolist())
    assert sorted(a_train.tolist() + a_val.tolist()) == list(range(100))
    c_train, _ = split_indices(100, 0.2, True, seed=8)
    assert not torch.equal(a_train, c_train)


def test_grouped_split_never_puts_a_question_on_both_sides():
    groups = [f"q{i % 7}" for i in range(50)]
    train, val = split_indices(50, 0.3, True, 0, groups)
    assert not {groups[i] for i in train.tolist()} & {groups[i] for i in val.tolist()}


def test_autoencoder_dataset_from_embeddings_processing_and_loaders():
    emb = torch.randn(50, 6) * 3 + 1
    cfg = DataConfig(validation_split=0.2, center_embeddings=True, normalize_embeddings=True)
    ds = AutoencoderDataset(embeddings=emb, config=cfg, seed=3)
    assert len(ds) == 40 and len(ds.validation) == 10
    x, y = ds[0]
    assert torch.equal(x, y), "an autoencoder pair is one embedding twice"
    torch.testing.assert_close(y.norm(), torch.tensor(1.0))
    train_mean = (emb[ds.train_indices]).mean(0)
    torch.testing.assert_close(ds.mean, train_mean), "centred on the training split's mean"
    batches = list(ds.get_dataloader(batch_size=16))
    assert [b[0].shape[0] for b in batches] == [16, 16, 8]
    assert sum(b[0].shape[0] for b in ds.get_dataloader(8, validation=True)) == 10
    stats = ds.get_statistics()
    assert stats["train_size"] == 40 and stats["dim"] == 6 and stats["centered"]


def test_max_samples_and_bad_configs():
    ds = AutoencoderDataset(embeddings=torch.randn(30, 4), config=DataConfig(max_samples=10))
    assert len(ds) + len(ds.validation) == 10
    with pytest.raises(ValueError, match="validation_split"):
        DataConfig(validation_split=1.5)
    with pytest.raises(UnknownKeyError, match=r"unknown config section 'data' key\(s\) \['validaton_split'\]"):
        create_text_dataset(TEXTS, encoder=FakeEncoder(), validaton_split=0.1)
    with pytest.raises(ValueError, match="NaN"):
        AutoencoderDataset(embeddings=torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="empty"):
        create_text_dataset([], encoder=FakeEncoder())


# --- files -----------------------------------------------------------------------------------------------------


def test_every_text_file_format(tmp_path):
    enc = FakeEncoder()
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "third"}) + "\n" + json.dumps({"text": "fourth"}) + "\n")
    (tmp_path / "a.json").write_text(json.dumps([{"text": "fifth"}, "sixth"]))
    (tmp_path / "a.csv").write_text("id,text\n1,seventh\n2,eighth\n")
    paths = [tmp_path / n for n in ("a.txt", "a.jsonl", "a.json", "a.csv")]
    ds = create_file_dataset(paths, encoder=enc, use_cache=False, validation_split=0.0)
    assert ds.texts == ["first line", "second line", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
    assert len(ds) == 8


def test_embedding_files(tmp_path):
    emb = torch.randn(9, 5)
    torch.save(emb, tmp_path / "e.pt")
    np.save(tmp_path / "e.npy", emb.numpy())
    ds = create_file_dataset([tmp_path / "e.pt", tmp_path / "e.npy"], validation_split=0.0,
                             normalize_embeddings=False)
    assert torch.allclose(ds.inputs, torch.cat([emb, emb]))


def test_bad_files_raise_clear_errors(tmp_path):
    enc = FakeEncoder()
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        create_file_dataset(tmp_path / "missing.txt", encoder=enc)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no texts"):
        create_file_dataset(tmp_path / "empty.txt", encoder=enc)
    (tmp_path / "b.csv").write_text("id,body\n1,x\n")
    with pytest.raises(KeyError, match="'text'"):
        create_file_dataset(tmp_path / "b.csv", encoder=enc)
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(KeyError, match="'text'"):
        create_file_dataset(tmp_path / "b.jsonl", encoder=enc)
    (tmp_path / "b.xml").write_text("<x/>")
    with pytest.raises(ValueError, match="unsupported"):
        create_file_dataset(tmp_path / "b.xml", encoder=enc)


def test_a_csv_cell_over_csvs_field_limit_is_read_and_a_bad_csv_names_file_and_line(tmp_path, monkeypatch):
    """A cell over 131,072 characters gave a raw _csv.Error traceback from train and evaluate."""
    import csv

    from cubecore.errors import CubecoreError

    long = "x" * 200_000
    (tmp_path / "long.csv").write_text(f"question,answer\nhi,hello\nwhy?,{long}\n")
    pairs, _ = read_dialogue(tmp_path / "long.csv")
    assert pairs == [("hi", "hello"), ("why?", long)]
    (tmp_path / "long_text.csv").write_text(f"text\nshort\n{long}\n")
    assert create_file_dataset(tmp_path / "long_text.csv", encoder=FakeEncoder(), use_cache=False).texts[1] == long
    assert csv.field_size_limit() == 131072, "csv's limit is lifted only while cubecore reads a file"
    # a file csv still refuses (here: with csv's limit kept) is one clear error naming the file and line
    monkeypatch.setattr(csv, "field_size_limit", lambda *new: 131072)
    with pytest.raises(CubecoreError, match=r"long\.csv:3: not valid CSV \(field larger than field limit"):
        read_dialogue(tmp_path / "long.csv")


def test_a_lone_surrogate_json_escape_names_the_file_and_line(tmp_path):
    """json reads "\\ud800" as a string UTF-8 cannot hold; it failed later in the cache without a file or line."""
    from cubecore.errors import CubecoreError

    enc = FakeEncoder()
    (tmp_path / "d.jsonl").write_text('{"question": "hi", "answer": "a"}\n{"question": "bad \\ud800 x", "answer": "b"}\n')
    with pytest.raises(CubecoreError, match=r"d\.jsonl:2: the JSON escape \\ud800 is half of a surrogate pair"):
        create_dialogue_dataset(tmp_path / "d.jsonl", encoder=enc, cache_dir=str(tmp_path / "cache"))
    (tmp_path / "t.json").write_text('[\n"fine \\ud83d\\ude00 emoji",\n"also \\\\ud800 fine",\n"cut \\ud83d"\n]')
    with pytest.raises(CubecoreError, match=r"t\.json:4: the JSON escape \\ud83d"):
        create_file_dataset(tmp_path / "t.json", encoder=enc, cache_dir=str(tmp_path / "cache"))
    (tmp_path / "ok.json").write_text('["fine \\ud83d\\ude00 emoji", "also \\\\ud800 fine"]')
    assert create_file_dataset(tmp_path / "ok.json", encoder=enc, use_cache=False).texts[0] == "fine \U0001F600 emoji"
    with pytest.raises(CubecoreError, match=r"texts item 1 holds a lone surrogate"):
        create_text_dataset(["ok", "bad \ud800"], encoder=enc, cache_dir=str(tmp_path / "cache"))


def test_missing_texts_are_skipped_not_the_text_none(tmp_path):
    enc = FakeEncoder()
    (tmp_path / "t.csv").write_text("id,text\n1,first\n2\n3,\n4,second\n")  # row 2 has no cell, row 3 an empty one
    (tmp_path / "t.jsonl").write_text('{"text": "third"}\n{"text": null}\n')
    for name, expected in (("t.csv", ["first", "second"]), ("t.jsonl", ["third"])):
        with pytest.warns(RuntimeWarning, match=r"skipped \d+ empty or missing") as record:
            ds = create_file_dataset(tmp_path / name, encoder=enc, use_cache=False, validation_split=0.0)
        assert ds.texts == expected
        assert str(tmp_path / name) in str(record[0].message)


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl", "json"])
def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path, fmt):
    enc = FakeEncoder()
    texts = {"txt": "first\nsecond\n", "csv": "text,id\nfirst,1\nsecond,2\n",
             "jsonl": '{"text": "first"}\n{"text": "second"}\n', "json": '[{"text": "first"}, "second"]'}
    path = tmp_path / f"t.{fmt}"
    path.write_bytes(b"\xef\xbb\xbf" + texts[fmt].encode("utf-8"))
    ds = create_file_dataset(path, encoder=enc, use_cache=False, validation_split=0.0)
    assert ds.texts == ["first", "second"]
    dialogue = {"txt": "hi\thello\n", "csv": "question,answer\nhi,hello\n", "jsonl": '{"question": "hi", "answer": "hello"}\n',
                "json": '[{"question": "hi", "answer": "hello"}]'}
    path.write_bytes(b"\xef\xbb\xbf" + dialogue[fmt].encode("utf-8"))
    assert read_dialogue(path) == ([("hi", "hello")], [])


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl", "json"])
def test_a_file_that_is_not_utf8_is_a_clear_error(tmp_path, fmt):
    path = tmp_path / f"latin1.{fmt}"
    body = {"txt": "caf\u00e9\n", "csv": "text\ncaf\u00e9\n", "jsonl": '{"text": "caf\u00e9"}\n',
            "json": '["caf\u00e9"]'}[fmt]
    path.write_bytes(("ok\n" if fmt == "txt" else "") .encode() + body.encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8") as info:
        create_file_dataset(path, encoder=FakeEncoder(), use_cache=False)
    assert not isinstance(info.value, UnicodeDecodeError)
    assert str(path) in str(info.value)
    line = {"txt": 2, "csv": 2, "jsonl": 1, "json": 1}[fmt]
    assert f"{path}:{line}:" in str(info.value)


class _RunsCode:
    """Unpickled, it would create the file ``marker``: reading a data file must never get that far."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _write_unreadable(path, marker):
    """Data files that Python's readers cannot take as they are (each was a traceback from the commands)."""
    name = path.name
    if name == "long_int.jsonl":  # over Python's 4300 digits for int
        path.write_text('{"text": "fine"}\n{"text": ' + "7" * 5000 + "}\n")
    elif name == "long_int.json":
        path.write_text('[\n"fine",\n' + "7" * 5000 + "\n]")
    elif name == "deep.json":  # past Python's recursion limit
        path.write_text("[\n" + "[" * 100_000 + "]" * 100_000 + "\n]")
    elif name == "deep.jsonl":
        path.write_text('"fine"\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    elif name == "pickle.pt":
        path.write_bytes(pickle.dumps(_RunsCode(marker)))
    elif name == "objects.pt":
        torch.save({"embeddings": _RunsCode(marker)}, path)
    elif name == "garbage.pt":
        path.write_bytes(b"these bytes are not a torch file")
    elif name == "objects.npy":
        np.save(path, np.array([[1.0, _RunsCode(marker)]], dtype=object), allow_pickle=True)
    elif name == "strings.npy":
        np.save(path, np.array([["0.5", "0.25"]]))
    return path


UNREADABLE = {"long_int.jsonl": r"long_int\.jsonl:2: an integer of 5000 digits",
              "long_int.json": r"long_int\.json:3: an integer of 5000 digits",
              "deep.json": r"deep\.json:2: JSON nested 100001 levels deep",
              "deep.jsonl": r"deep\.jsonl:2: JSON nested 100000 levels deep",
              "pickle.pt": r"pickle\.pt was refused: torch\.load\(weights_only=True\)",
              "objects.pt": r"objects\.pt was refused: .* could run code when loaded \(here \S+\)",
              "garbage.pt": r"garbage\.pt(: not a readable torch file| was refused)",
              "objects.npy": r"objects\.npy was refused: an array of Python objects",
              "strings.npy": r"strings\.npy: holds an array of dtype <U4"}


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_data_files_python_cannot_read_are_one_error_naming_file_and_line(tmp_path, name):
    """A long integer, deep nesting, a pickle, garbage, an object or string array: tracebacks before; none ran
    code then and none may now."""
    marker = tmp_path / "code-ran"
    path = _write_unreadable(tmp_path / name, marker)
    with pytest.raises(CubecoreError, match=UNREADABLE[name]) as info:
        create_file_dataset(path, encoder=FakeEncoder(), use_cache=False)
    assert len(str(info.value).splitlines()) == 1
    if path.suffix in (".json", ".jsonl"):
        with pytest.raises(CubecoreError, match=UNREADABLE[name]):
            read_dialogue(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_the_train_command_says_an_unreadable_data_file_in_one_line(tmp_path, fake_teacher, capsys, name):
    marker = tmp_path / "code-ran"
    path = _write_unreadable(tmp_path / name, marker)
    status = train_cli.main(["--data", str(path), "--mode", "autoencoder", "--output-dir", str(tmp_path / "run"),
                             "--epochs", "1", f"cache_dir={tmp_path / 'cache'}", "lattice_size=[2, 2, 3]",
                             "state_size=4", "hidden_size=8", "steps=2", "device=cpu", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(UNREADABLE[name], err) and not marker.exists()


@pytest.mark.parametrize("name", ["deep.json", "pickle.pt"])
def test_python_m_cubecore_train_on_an_unreadable_data_file_exits_2_with_one_line(tmp_path, name):
    """In a process of its own: the stack depth is the command's, and nothing (torch's warnings) comes before."""
    path = _write_unreadable(tmp_path / name, tmp_path / "code-ran")
    done = subprocess.run([sys.executable, "-m", "cubecore.train", "--data", str(path), "--mode", "autoencoder",
                           "--output-dir", str(tmp_path / "run"), "--epochs", "1", "device=cpu"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stderr.startswith(f"error: {path}"), done.stderr
    assert re.search(UNREADABLE[name], done.stderr) and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "code-ran").exists()


def test_embeddings_in_another_byte_order_are_read_and_complex_ones_refused(tmp_path):
    emb = np.arange(6, dtype=">f4").reshape(2, 3)  # big-endian: torch.from_numpy refused it
    np.save(tmp_path / "big_endian.npy", emb)
    assert torch.equal(read_embeddings(tmp_path / "big_endian.npy"), torch.arange(6.0).reshape(2, 3))
    np.save(tmp_path / "complex.npy", emb.astype(np.complex64))  # .float() dropped the imaginary part unsaid
    torch.save(torch.ones(2, 3, dtype=torch.complex64), tmp_path / "complex.pt")
    for name in ("complex.npy", "complex.pt"):
        with pytest.raises(CubecoreError, match=r"complex.*embeddings are real numbers"):
            read_embeddings(tmp_path / name)


def test_dataset_argument_checks_use_the_package_conventions():
    emb = torch.randn(10, 4)
    with pytest.raises(TypeError, match="max_samples"):
        DataConfig(max_samples=2.5)
    with pytest.raises(ValueError, match="max_samples"):
        DataConfig(max_samples=0)
    assert DataConfig(max_samples=np.int64(5)).max_samples == 5
    with pytest.raises(TypeError, match="validation_split"):
        DataConfig(validation_split="0.2")
    with pytest.raises(ValueError, match="mixed_dialogue_fraction"):
        DataConfig(mixed_dialogue_fraction=float("inf"))
    with pytest.raises(TypeError, match="context_window"):
        DataConfig(context_window=1.0)
    with pytest.raises(ValueError, match="min_length"):
        DataConfig(min_length=5, max_length=2)
    with pytest.raises(UnknownKeyError, match="context_windw"):
        create_dialogue_dataset([("a", "b")], encoder=FakeEncoder(), context_windw=2)
    with pytest.raises(TypeError, match="embeddings"):
        AutoencoderDataset(embeddings=emb.tolist())
    with pytest.raises(TypeError, match="question_embeddings"):
        DialogueDataset(question_embeddings=emb.numpy(), answer_embeddings=emb)
    with pytest.raises(TypeError, match="batch_size"):
        AutoencoderDataset(embeddings=emb).get_dataloader(batch_size=4.0)
    with pytest.raises(TypeError, match="pairs"):
        DialogueDataset(pairs=["ab"], encoder=FakeEncoder())


# --- dialogue --------------------------------------------------------------------------------------------------


def test_dialogue_files_and_pairs(tmp_path):
    enc = FakeEncoder()
    (tmp_path / "d.txt").write_text("hi\thello\nhow are you?\tfine\n")
    (tmp_path / "d.csv").write_text("question,answer\nhi,hello\nbye,see you\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "q1", "answer": "a1"}) + "\n"
                                      + json.dumps(["t1", "t2", "t3"]) + "\n")
    (tmp_path / "d.json").write_text(json.dumps([{"question": "q2", "answer": "a2"}]))
    sizes = {}
    for name in ("d.txt", "d.csv", "d.jsonl", "d.json"):
        ds = create_dialogue_dataset(tmp_path / name, encoder=enc, use_cache=False, validation_split=0.0)
        sizes[name] = len(ds)
    assert sizes == {"d.txt": 2, "d.csv": 2, "d.jsonl": 3, "d.json": 1}
    pairs, convs = read_dialogue(tmp_path / "d.jsonl")
    assert pairs == [("q1", "a1")] and convs == [["t1", "t2", "t3"]]
    (tmp_path / "bad.txt").write_text("no separator here\n")
    with pytest.raises(ValueError, match="separator"):
        create_dialogue_dataset(tmp_path / "bad.txt", encoder=enc)


def test_quality_filter_counts_what_it_drops():
    cfg = DataConfig(min_length=2, max_length=20, long_pairs="drop")
    pairs = [("hi", "hello"), ("hi", "hello"), ("", "x"), ("q", "too short q"), ("ok", "x" * 30), ("why?", "because")]
    kept, report = filter_pairs(pairs, cfg)
    assert kept == [("hi", "hello"), ("why?", "because")]
    assert report == {"empty": 1, "too_short": 1, "too_long": 1, "duplicate": 1, "truncated": 0}
    kept, report = filter_pairs(pairs, cfg.replace(long_pairs="truncate"))
    assert kept == [("hi", "hello"), ("ok", "x" * 20), ("why?", "because")]
    assert report == {"empty": 1, "too_short": 1, "too_long": 0, "duplicate": 1, "truncated": 1}
    kept, report = filter_pairs(pairs, cfg.replace(max_length=None))
    assert ("ok", "x" * 30) in kept and report["truncated"] == 0


def test_long_pairs_are_truncated_not_dropped_and_every_count_is_in_the_run_output(tmp_path, caplog):
    """60 pairs with 50 answers over 1,000 characters used to become 10 pairs without a word."""
    from cubecore import TrainingConfig
    from cubecore.data import prepare_data

    path = tmp_path / "long.jsonl"
    long = "word " * 300  # 1,500 characters
    path.write_text("\n".join(json.dumps({"question": f"question {i}", "answer": f"answer {i} " + long * (i >= 10)})
                              for i in range(60)) + "\n")
    enc = FakeEncoder()
    with caplog.at_level("INFO", logger="cubecore"):
        ds = create_dialogue_dataset(path, encoder=enc, use_cache=False)
    assert len(ds) + len(ds.validation) == 60
    assert max(len(a) for a in ds.answers) == 1000
    assert ds.get_statistics()["truncated"] == 50 and sum(ds.get_statistics()["dropped"].values()) == 0
    line = caplog.records[-1].getMessage()
    assert caplog.records[-1].name.startswith("cubecore.")
    assert "60 pair(s), 60 used" in line and "50 truncated to data.max_length" in line, line
    for count in ("0 empty", "0 shorter than data.min_length", "0 longer than data.max_length", "0 duplicate"):
        assert count in line, line
    # the old behaviour, asked for by the data option of a run's config
    config = TrainingConfig(**{"data.source": str(path), "data.long_pairs": "drop", "data.use_cache": False})
    caplog.clear()
    with caplog.at_level("INFO", logger="cubecore"):
        data = prepare_data(config.data, config.seed, enc)
    assert data.train[0].shape[0] + data.val[0].shape[0] == 10
    assert "50 longer than data.max_length (1000 characters; data.long_pairs=drop)" in caplog.text
    with pytest.raises(ValueError, match="long_pairs"):
        DataConfig(long_pairs="cut")
    with pytest.raises(ValueError, match="max_length"):
        DataConfig(max_length=0)
    assert DataConfig(max_length=None).max_length is None


def test_missing_answers_are_dropped_and_counted_not_the_text_none(tmp_path):
    enc = FakeEncoder()
    (tmp_path / "d.csv").write_text("question,answer\nhi,hello\nwhat?\nbye,see you\nand?,\n")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"question": "hi", "answer": "hello"}, {"question": "what?", "answer": None},
        {"question": None, "answer": "x"}, ["t1", None, "t3"]]) + "\n")
    (tmp_path / "d.json").write_text(json.dumps([{"question": "hi", "answer": "hello"},
                                                 {"question": "what?", "answer": None}]))
    expected = {"d.csv": (2, 2), "d.jsonl": (1, 4), "d.json": (1, 1)}
    for name, (kept, empty) in expected.items():
        ds = create_dialogue_dataset(tmp_path / name, encoder=enc, use_cache=False, validation_split=0.0)
        questions, answers = ds.texts()
        assert "None" not in questions + answers
        assert all(q and a for q, a in zip(questions, answers))
        assert len(ds) == kept, name
        assert ds.filter_report["empty"] == empty, name
        assert ds.get_statistics()["dropped"]["empty"] == empty, name
    kept, report = filter_pairs([("q", None), (None, "a"), ("q", "a")], DataConfig())
    assert kept == [("q", "a")] and report["empty"] == 2


def test_conversations_become_pairs_with_context():
    conv = [["a", "b", "c", "d"]]
    assert conversations_to_pairs(conv) == [("a", "b"), ("b", "c"), ("c", "d")]
    assert conversations_to_pairs(conv, context_window=2) == [("a", "b"), ("a b", "c"), ("b c", "d")]


def test_dialogue_dataset_keeps_texts_and_splits_by_question():
    enc = FakeEncoder()
    pairs = [(f"q{i % 10}", f"a{i}") for i in range(60)]
    ds = DialogueDataset(pairs=pairs, config=DataConfig(validation_split=0.3, use_cache=False), encoder=enc)
    tq, ta = ds.texts()
    vq, va = ds.texts(validation=True)
    assert not set(tq) & set(vq)
    assert len(tq) + len(vq) == 60
    x, y = ds.split_tensors(validation=True)
    assert torch.allclose(x[0], torch.nn.functional.normalize(enc.encode([vq[0]])[0], dim=0))
    assert torch.allclose(y[0], torch.nn.functional.normalize(enc.encode([va[0]])[0], dim=0))


def test_named_sources_load_offline():
    chatter = load_conversations("chatterbot")
    pairs = conversations_to_pairs(chatter)
    assert 2000 <= len(pairs) <= 4000
    assert sum(1 for q, a in pairs if q and a) >= 0.99 * len(pairs)  # the quality filter drops the rest
    with pytest.raises(ValueError, match="named sources"):
        load_conversations("reddit")


def test_chitchat_source():
    convs = load_conversations("chitchat")
    assert len(convs) > 5000 and all(len(c) >= 1 for c in convs[:100])


def test_chatterbot_dialogue_with_the_real_teacher(tmp_path, monkeypatch):
    """The 'done' path on a slice: real Q->A pairs, the default teacher offline, second call from the cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from cubecore import TeacherEncoder

    teacher = TeacherEncoder()
    ds = create_dialogue_dataset("chatterbot", encoder=teacher, cache_dir=str(tmp_path), max_samples=40)
    assert ds.dim == 384 and len(ds) + len(ds.validation) == 40
    again = create_dialogue_dataset("chatterbot", encoder=teacher, cache_dir=str(tmp_path), max_samples=40)
    assert teacher.calls == 1
    assert torch.equal(ds.inputs, again.inputs)


def test_named_source_works_where_a_path_does():
    enc = FakeEncoder()
    ds = create_file_dataset("chatterbot", encoder=enc, use_cache=False, max_samples=30)
    assert len(ds) + len(ds.validation) == 30
    assert all(isinstance(t, str) and t for t in ds.texts)


def test_the_fingerprint_says_what_the_pairs_of_each_split_are(tmp_path):
    from cubecore.data import prepare_data

    def fingerprint(lines, mode="dialogue", seed=42, **kw):
        path = tmp_path / "d.txt"
        path.write_text("\n".join(lines) + "\n")
        config = DataConfig(source=str(path), mode=mode, cache_dir=str(tmp_path / "cache"), **kw)
        return prepare_data(config, seed, FakeEncoder(dim=8)).fingerprint

    lines = [f"question {i % 9}\tanswer {i}" for i in range(40)]
    same = fingerprint(lines)
    assert same == fingerprint(lines) and same["train"] + same["validation"] == 40
    changed = [fingerprint(lines[:-1] + ["question 1\tanother answer"]),  # one text
               fingerprint(lines, validation_split=0.3),  # the split
               fingerprint(lines, seed=1)]
    assert len({f["sha256"] for f in [same, *changed]}) == 4  # (the mode is a setting, checked as one on resume)
    embeddings = tmp_path / "e.pt"  # data without texts: its embeddings
    torch.save(torch.randn(20, 8), embeddings)
    config = DataConfig(source=str(embeddings), mode="autoencoder")
    first = prepare_data(config, 42).fingerprint
    assert first == prepare_data(config, 42).fingerprint
    torch.save(torch.randn(20, 8), embeddings)
    assert prepare_data(config, 42).fingerprint["sha256"] != first["sha256"]
