"""A corpus tokenised once into a flat file of token ids (numpy memmap), reused while the sources are unchanged.

Documents are concatenated, each followed by the tokenizer's end-of-text token (when it has one). The file's
name holds a hash of the sources (paths, sizes, modification times) and the tokenizer, so a changed corpus or
tokenizer gives a new file instead of stale tokens. Written to a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from hybridlm.atomic_files import atomic_path, atomic_write_text
from hybridlm.data.corpus import corpus_files, iter_documents
from hybridlm.tokenizer import ByteTokenizer, HFTokenizer


def tokenizer_id(tokenizer: ByteTokenizer | HFTokenizer) -> str:
    """"byte", or "hf:<sha256 of the tokenizer.json>" (what the token ids depend on)."""
    if isinstance(tokenizer, HFTokenizer):
        return "hf:" + hashlib.sha256(tokenizer.path.read_bytes()).hexdigest()[:16]
    return "byte"


def _encode(tokenizer: ByteTokenizer | HFTokenizer, text: str) -> np.ndarray:
    if isinstance(tokenizer, ByteTokenizer):  # UTF-8 bytes are the ids: skip the Python list
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def _source_key(files: list[Path], tokenizer: ByteTokenizer | HFTokenizer) -> str:
    h = hashlib.sha256(tokenizer_id(tokenizer).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def tokenize_corpus(data: str | Path | list[str | Path] | None, tokenizer: ByteTokenizer | HFTokenizer,
                    cache_dir: str | Path | None = None) -> np.ndarray:
    """All token ids of the corpus ``data`` (see ``corpus_files``), 1-d. With ``cache_dir``, stored there as
    ``tokens-<key>.bin`` (+ ``.json``) and memory-mapped, and reused by later calls; else kept in memory."""
    files = corpus_files(data)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        key = _source_key(files, tokenizer)
        path, meta_path = cache_dir / f"tokens-{key}.bin", cache_dir / f"tokens-{key}.json"
        if path.is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            return _checked(np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],)), files)
        n = 0
        with atomic_path(path) as tmp, tmp.open("wb") as out:
            for ids in _iter_ids(files, tokenizer):
                out.write(ids.astype(dtype).tobytes())
                n += len(ids)
            _checked(np.zeros(n, dtype=dtype), files)  # refuse an empty corpus before anything is kept
        meta = {"n_tokens": n, "dtype": np.dtype(dtype).name, "tokenizer": tokenizer_id(tokenizer),
                "files": len(files), "first_file": str(files[0])}
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")  # last: it marks the tokens complete
        return np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    parts = list(_iter_ids(files, tokenizer))
    return _checked(np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype), files)


def _iter_ids(files: list[Path], tokenizer: ByteTokenizer | HFTokenizer):
    eos = tokenizer.eos_token_id
    for f in files:
        for doc in iter_documents(f):
            if not doc:
                continue
            ids = _encode(tokenizer, doc)
            yield ids if eos is None else np.append(ids.astype(np.int64), eos)


def _checked(tokens: np.ndarray, files: list[Path]) -> np.ndarray:
    if len(tokens) == 0:
        where = str(files[0]) if len(files) == 1 else f"{len(files)} files from {files[0]}"
        raise ValueError(f"data: the corpus is empty: {where} holds no text")
    return tokens
