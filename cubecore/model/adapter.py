"""A trained cube as a sentence-transformers model: the query adapter of the dialogue mode.

Questions go through the teacher and then the cube (``encode_query``); answers through the teacher alone
(``encode_document``).  sentence-transformers' ``Router`` holds the two routes; the teacher's modules are
shared by both, so its weights are stored once.  ``CubeAdapter`` is the sentence-transformers module that
wraps an ``EmbeddingProcessor`` and stores it with the processor's own ``save_pretrained`` (safetensors + JSON).
Load an export with ``load_adapter(folder)``: it runs no code from the folder.  It refuses a folder whose
``modules.json`` or router config names any class but sentence-transformers' own and ``CubeAdapter``, and gives
sentence-transformers ``CubeAdapter`` itself, so ``trust_remote_code`` stays off.
``SentenceTransformer(folder, trust_remote_code=True)`` loads the same folder too, but it imports whatever
class the folder's files name (a module file placed in the folder included): only for folders you trust.
Either way cubecore must be installed; the kernel is optional, the pure-PyTorch reference computes the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Module, Normalize, Pooling, Router, Transformer

from ..data.teacher import TeacherEncoder
from .processor import EmbeddingProcessor
from ..errors import InvalidTypeError, InvalidValueError, UnavailableError
from ..locate import locate


class CubeAdapter(Module):
    """Replaces the ``sentence_embedding`` with the cube's prediction for it."""

    def __init__(self, processor: EmbeddingProcessor) -> None:
        super().__init__()
        if not isinstance(processor, EmbeddingProcessor):
            raise InvalidTypeError(f"processor must be an EmbeddingProcessor, got {type(processor).__name__}")
        self.processor = processor

    def forward(self, features: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        embedding = features["sentence_embedding"]
        weight = self.processor.readout_weight
        prediction = self.processor(embedding.to(weight.device, weight.dtype))
        features["sentence_embedding"] = prediction.to(embedding.dtype)
        return features

    def get_embedding_dimension(self) -> int:
        return self.processor.input_dim

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.processor.save_pretrained(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None,
             local_files_only: bool = False, **kwargs) -> "CubeAdapter":
        folder = cls.load_dir_path(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                   revision=revision, local_files_only=local_files_only)
        # backend "auto": the kernel where it runs (its device and dtype), else the reference, whatever
        # backend the run was trained with
        return cls(EmbeddingProcessor.from_pretrained(folder, backend="auto"))


def teacher_modules(teacher: TeacherEncoder) -> List[Module]:
    """The sentence-transformers modules that compute ``teacher.encode``: the model's own where it is a
    sentence-transformers model, else Transformer + Pooling (+ Normalize), as the teacher pools."""
    if teacher.prompt:
        raise InvalidValueError(f"a teacher with a prompt ({teacher.prompt_name!r}) cannot be exported: the trainer's "
                         f"teacher encodes without one")
    if teacher.backend == "sentence-transformers":
        modules = list(SentenceTransformer(teacher.location, device="cpu", local_files_only=True))
    else:
        modules = [Transformer(teacher.location, model_kwargs={"local_files_only": True},
                               processor_kwargs={"local_files_only": True},
                               config_kwargs={"local_files_only": True}),
                   Pooling(teacher.dim, pooling_mode=teacher.pooling)]
    if teacher.normalize and not any(isinstance(m, Normalize) for m in modules):
        modules.append(Normalize())
    if not teacher.normalize and any(isinstance(m, Normalize) for m in modules):
        raise InvalidValueError(f"the teacher {teacher.name} normalises its embeddings itself; normalize=False cannot be "
                         f"exported")
    modules[0].max_seq_length = teacher.max_length
    return modules


def query_adapter(teacher: TeacherEncoder, processor: EmbeddingProcessor) -> SentenceTransformer:
    """A SentenceTransformer whose ``encode_query`` is ``processor(teacher.encode(texts))`` (normalised to unit
    length where the teacher normalises) and whose ``encode_document`` (and plain ``encode``) is
    ``teacher.encode(texts)``."""
    if processor.input_dim != teacher.dim:
        raise InvalidValueError(f"the processor takes {processor.input_dim}-D embeddings, the teacher {teacher.name} "
                         f"gives {teacher.dim}-D")
    shared = teacher_modules(teacher)
    # Where the teacher gives unit vectors, so does the query route: the cube's prediction is normalised as the
    # documents are, so that inner-product indexes (FAISS) rank as cosine does.
    query = [*shared, CubeAdapter(processor)] + ([Normalize()] if teacher.normalize else [])
    router = Router.for_query_document(query_modules=query, document_modules=shared)
    return SentenceTransformer(modules=[router], device="cpu", similarity_fn_name="cosine")




CUBE_ADAPTER_TYPE = f"{CubeAdapter.__module__}.{CubeAdapter.__qualname__}"
ROUTER_CONFIG = "router_config.json"


def _allowed(class_ref: object) -> bool:
    return isinstance(class_ref, str) and (class_ref == CUBE_ADAPTER_TYPE
                                           or class_ref.startswith("sentence_transformers."))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidValueError(f"{path} is not a readable JSON file ({exc}): not a cubecore export") from None


def check_adapter_folder(folder: Union[str, os.PathLike]) -> Path:
    """The export folder, checked: one that is not there is a NotFoundError (``cubecore.locate``; an export is
    never looked up on the hub), and one whose ``modules.json`` or router configs name a module class other than
    sentence-transformers' own and ``CubeAdapter`` is refused (InvalidValueError, naming the file and the
    class): such a class would be imported, and code run, when the folder loads."""
    folder = locate(folder, "export folder", hub=False)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        raise FileNotFoundError(f"{folder} has no modules.json: not a folder written by python -m cubecore.export")
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise InvalidValueError(f"{modules_file} is not a list of modules: not a cubecore export")
    for module in modules:
        class_ref = module.get("type")
        if not _allowed(class_ref):
            raise InvalidValueError(f"{modules_file} names the module class {class_ref!r}, which a cubecore export "
                                    f"does not hold; loading it would import and run that code, so it is refused")
        if isinstance(class_ref, str) and class_ref.rsplit(".", 1)[-1] == "Router":
            config_file = folder / str(module.get("path", "")) / ROUTER_CONFIG
            types = _read_json(config_file).get("types", {}) if config_file.is_file() else {}
            if not isinstance(types, dict):
                raise InvalidValueError(f"{config_file} holds no table of module types: not a cubecore export")
            for name, ref in types.items():
                if not _allowed(ref):
                    raise InvalidValueError(f"{config_file} names the class {ref!r} for its module {name!r}, which a "
                                            f"cubecore export does not hold; loading it would import and run that "
                                            f"code, so it is refused")
    return folder


def load_adapter(folder: Union[str, os.PathLike], device: Optional[str] = None, **kwargs) -> SentenceTransformer:
    """The query adapter that ``python -m cubecore.export`` wrote to ``folder``, loaded without running code
    from the folder: its module classes are checked (``check_adapter_folder``), sentence-transformers is given
    ``CubeAdapter`` itself, and ``trust_remote_code`` stays off.  ``kwargs`` go to ``SentenceTransformer``."""
    if kwargs.get("trust_remote_code"):
        raise InvalidValueError("load_adapter loads without trust_remote_code; for that, use SentenceTransformer("
                                "folder, trust_remote_code=True) on a folder you trust")
    folder = check_adapter_folder(folder)
    load = getattr(SentenceTransformer, "_load_with_module_classes", None)
    if load is None:
        import sentence_transformers

        raise UnavailableError(f"load_adapter needs a sentence-transformers that can be given a module's class "
                               f"(6.3 can; this is {sentence_transformers.__version__}): upgrade it, or load a "
                               f"folder you trust with SentenceTransformer(folder, trust_remote_code=True)")
    kwargs.setdefault("local_files_only", True)
    return load(str(folder), {CUBE_ADAPTER_TYPE: CubeAdapter}, device=device, trust_remote_code=False, **kwargs)
