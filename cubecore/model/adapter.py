"""A trained cube as a sentence-transformers model: the query adapter of the dialogue mode.

Questions go through the teacher and then the cube (``encode_query``); answers through the teacher alone
(``encode_document``).  sentence-transformers' ``Router`` holds the two routes; the teacher's modules are
shared by both, so its weights are stored once.  ``CubeAdapter`` is the sentence-transformers module that
wraps an ``EmbeddingProcessor`` and stores it with the processor's own ``save_pretrained`` (safetensors + JSON).
Loading needs ``trust_remote_code=True`` (the adapter's class lives in cubecore, outside sentence-transformers)
and cubecore installed; the kernel is optional, the pure-PyTorch reference computes the same.
"""

from __future__ import annotations

from typing import Any, Dict, List

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Module, Normalize, Pooling, Router, Transformer

from ..data.teacher import TeacherEncoder
from .processor import EmbeddingProcessor
from ..errors import InvalidTypeError, InvalidValueError


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


