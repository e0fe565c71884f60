"""Corpora, tokenisation into windows and batches, and concept labelling."""

from .batches import TokenBatch, TokenLabeller, Window, collate, iter_batches, iter_windows, tokenize_document
from .corpus import Corpus, Document, iter_documents, resource_path

__all__ = [
    "Corpus", "Document", "TokenBatch", "TokenLabeller", "Window", "collate", "iter_batches", "iter_documents",
    "iter_windows", "resource_path", "tokenize_document",
]

from .concepts import ConceptLabeller, Lexicon, load_labeller, load_lexicon  # noqa: E402

__all__ += ["ConceptLabeller", "Lexicon", "load_labeller", "load_lexicon"]
