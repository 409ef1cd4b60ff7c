"""Where a loader's folder-or-hub-name argument points: one rule for every loader that takes one
(``EmbeddingProcessor.from_pretrained``, ``TeacherEncoder``, ``load_adapter``).

An existing folder is loaded from disk.  Anything else that could not be a Hugging Face id (an absolute path,
``./`` or ``~``, more than one ``/``, a ``Path`` object) is a local path that is not there: ``NotFoundError`` at
once, never a hub request.  A name that can be a hub id is looked up in the hub cache; if it is not cached, the
hub is asked once, without the retries huggingface_hub makes while downloading, so that a mistyped name is
refused in a moment, and with ``HF_HUB_OFFLINE`` set the hub is not asked at all.  Each failure is one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from .errors import InvalidTypeError, InvalidValueError, NotFoundError, UnavailableError

HUB_TIMEOUT = 10.0  # seconds for the one request that asks the hub whether a model exists


def hub_offline() -> bool:
    """Whether the hub is switched off: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set now or when
    huggingface_hub was imported (it reads them once)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or any(
        os.environ.get(name, "").strip().lower() in ("1", "on", "yes", "true")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def can_be_hub_id(name: object) -> bool:
    """Whether ``name`` is a string huggingface_hub accepts as a repo id (``name`` or ``namespace/name``)."""
    if not isinstance(name, str):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def locate(name: Union[str, os.PathLike], what: str, hub: bool = True, ask_hub: bool = True, file_hint: str = "",
           cache_file: str = "config.json", revision: Optional[str] = None, cache_dir=None, token=None,
           local_files_only: bool = False) -> Union[Path, str]:
    """The folder ``name`` names (a ``Path``), or the hub id to load (a ``str``), checked as the module says;
    ``what`` names the thing in messages ("model folder").  ``hub=False`` takes local folders only;
    ``ask_hub=False`` leaves a hub id's check (``check_on_hub``) to the loader, for a caller that only names
    models.  ``cache_file`` is a file every such model has (looked up in the hub cache); ``revision``,
    ``cache_dir``, ``token`` and ``local_files_only`` are the loader's own hub options."""
    kind = "a path or a Hugging Face id" if hub else "a path"
    if not isinstance(name, (str, os.PathLike)):
        raise InvalidTypeError(f"{what} must be {kind}, got {type(name).__name__}")
    text = os.fspath(name)
    if not isinstance(text, str) or not text.strip():
        raise InvalidValueError(f"{what} must be {kind}, got {text!r}")
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InvalidValueError(f"{path} is a file, not a {what}{file_hint}")
    if not (hub and can_be_hub_id(name)):
        where = "" if str(path.absolute()) == text else f" (no folder {path.absolute()})"
        raise NotFoundError(f"{what} not found: {text}{where}")
    if ask_hub:
        check_on_hub(name, what, cache_file, revision, cache_dir, token, local_files_only)
    return name


def locate_pretrained(name: Union[str, os.PathLike], what: str, file_hint: str, kwargs: dict) -> Union[Path, str]:
    """:func:`locate` for a ``from_pretrained(name, **kwargs)``, with the hub options it was given."""
    return locate(name, what, file_hint=file_hint, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"),
                  token=kwargs.get("token"), local_files_only=bool(kwargs.get("local_files_only")))


def check_on_hub(repo_id: str, what: str, cache_file: str = "config.json", revision: Optional[str] = None,
                 cache_dir=None, token=None, local_files_only: bool = False) -> None:
    """Nothing where the hub cache holds ``repo_id`` or the hub has it (asked once, with no retries); else one
    line saying which is missing, at once."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, cache_file, cache_dir=cache_dir, revision=revision), str):
        return
    here = f"not a folder here ({Path(repo_id).absolute()}) and not in the Hugging Face cache"
    if hub_offline() or local_files_only:
        switch = "HF_HUB_OFFLINE is set" if hub_offline() else "local_files_only=True"
        raise UnavailableError(f"{what} {repo_id!r}: {here}, and {switch}, so the hub was not asked; give a "
                               f"local directory, or download it once while online (hf download {repo_id})")
    try:
        HfApi(token=token).model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT)
    except RevisionNotFoundError:
        raise NotFoundError(f"{what} {repo_id!r}: {here}, and the hub has no revision {revision!r} of it") from None
    except RepositoryNotFoundError:  # also a private model without a login
        raise NotFoundError(f"{what} {repo_id!r}: {here}, and the Hugging Face hub has no such model (or it "
                            f"is private: hf auth login); give a local directory") from None
    except Exception as exc:  # no network, a proxy, the hub down: it cannot say
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnavailableError(f"{what} {repo_id!r}: {here}, and the Hugging Face hub cannot be reached "
                               f"({reason}); give a local directory, or set HF_HUB_OFFLINE=1 to work "
                               f"offline") from None
