"""One rule for every loader that takes a folder or a hub name (``cubecore.locate``): a folder that is not there
is a NotFoundError at once, never a hub request; only a name that can be a hub id goes to the hub, asked once;
offline, that is said in one line.  No test here touches the network: every hub call is replaced."""

import socket
import time
from pathlib import Path

import pytest

from cubecore import EmbeddingProcessor, TeacherEncoder
from cubecore import train as train_cli
from cubecore.errors import NotFoundError, UnavailableError
from cubecore.locate import can_be_hub_id, locate
from cubecore.model.adapter import load_adapter

LOADERS = {"from_pretrained": EmbeddingProcessor.from_pretrained, "TeacherEncoder": TeacherEncoder,
           "load_adapter": load_adapter}


@pytest.fixture
def no_network(monkeypatch):
    """Every name lookup and connection fails and is recorded; and the hub's own entry points are counted."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:2])
        raise OSError("the tests use no network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    return calls


def _one_line(exc):
    return len(str(exc).splitlines()) == 1


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("name", ["absolute", "runs/cube/modle", "./cube-model", "~/no-such-cubecore-folder",
                                  "path object"])
def test_a_folder_that_is_not_there_is_not_found_at_once_without_the_hub(loader, name, tmp_path, no_network,
                                                                        monkeypatch):
    """An absolute path was huggingface_hub's HFValidationError; a relative one that cannot be a hub id too."""
    monkeypatch.chdir(tmp_path)
    given = {"absolute": str(tmp_path / "missing"), "path object": Path("cube-model")}.get(name, name)
    start = time.monotonic()
    with pytest.raises(NotFoundError, match="not found") as info:
        LOADERS[loader](given)
    assert time.monotonic() - start < 3
    assert isinstance(info.value, FileNotFoundError) and _one_line(info.value)
    assert no_network == []


@pytest.mark.parametrize("loader", ["from_pretrained", "TeacherEncoder"])
def test_a_hub_name_offline_is_one_line_at_once(loader, tmp_path, no_network, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UnavailableError, match=r"'cube-model': not a folder here .* HF_HUB_OFFLINE is set, so "
                                               r"the hub was not asked.*hf download cube-model") as info:
        LOADERS[loader]("cube-model")
    assert time.monotonic() - start < 3 and _one_line(info.value)
    assert no_network == []


@pytest.mark.parametrize("loader", ["from_pretrained", "TeacherEncoder"])
def test_a_mistyped_hub_name_asks_the_hub_once_without_retries(loader, tmp_path, no_network, monkeypatch):
    """A relative name that can be a hub id spent about 25 s in huggingface_hub's retries without a network."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    asked = []

    def model_info(self, repo_id, **kwargs):
        asked.append(repo_id)
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    start = time.monotonic()
    with pytest.raises(UnavailableError, match=r"'cube-model': .*the Hugging Face hub cannot be reached "
                                               r"\(\[Errno -2\] Name or service not known\)") as info:
        LOADERS[loader]("cube-model")
    assert time.monotonic() - start < 3 and _one_line(info.value)
    assert asked == ["cube-model"] and no_network == []


def test_a_name_the_hub_does_not_have_is_not_found(tmp_path, no_network, monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.chdir(tmp_path)

    def model_info(self, repo_id, **kwargs):
        request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        raise RepositoryNotFoundError("404 Repository Not Found", response=httpx2.Response(404, request=request))

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    with pytest.raises(NotFoundError, match=r"'org/cube-model': not a folder here .*the Hugging Face hub has no "
                                            r"such model"):
        EmbeddingProcessor.from_pretrained("org/cube-model")


def test_what_goes_to_the_hub(tmp_path, no_network, monkeypatch):
    """Only a name that can be a hub id, and only when the hub cache does not hold it; a folder always wins."""
    import huggingface_hub

    assert can_be_hub_id("cube-model") and can_be_hub_id("org/cube-model")
    for name in ("/abs/cube", "./cube", "../cube", "~/cube", "runs/cube/model", "a\\b", "", Path("cube")):
        assert not can_be_hub_id(name), name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert locate("org/model", "model folder") == Path("org/model")
    asked = []
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **kw: asked.append(repo_id))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo_id, filename, **kw: "/cache/config.json" if repo_id == "org/cached" else None)
    assert locate("org/cached", "model folder") == "org/cached" and asked == []
    assert locate("org/on-hub", "model folder") == "org/on-hub" and asked == ["org/on-hub"]
    with pytest.raises(NotFoundError, match="export folder not found: org/on-hub"):
        locate("org/on-hub", "export folder", hub=False)
    (tmp_path / "file.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="file.pt is a file, not a model folder"):
        locate("file.pt", "model folder")
    assert no_network == []


def test_the_train_command_says_a_missing_teacher_folder_in_one_line(tmp_path, dialogue_file, no_network, capsys):
    status = train_cli.main(["--data", dialogue_file, "--teacher", str(tmp_path / "no-such-teacher"),
                             "--output-dir", str(tmp_path / "run"), "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: teacher model not found: {tmp_path / 'no-such-teacher'}"), err
    assert no_network == []
