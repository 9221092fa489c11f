"""Sample corpus made only of text the Python standard library installs.

Source: `pydoc_data.topics.topics`, the help topics of the running Python (real English
prose about the language). Output is deterministic for a given Python version; topic texts
change between Python releases.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from redknot_rag.retrieval.parser import Document

_PARAGRAPH_SPLIT_RE = re.compile(r"\n[ \t]*\n")


def topic_texts() -> dict[str, str]:
    """{topic name: help text}, sorted by name, stripped, empty topics dropped."""
    from pydoc_data.topics import topics

    return {k: v.strip() for k, v in sorted(topics.items()) if v.strip()}


def topic_title(name: str, text: str) -> str:
    first = text.splitlines()[0].strip() if text else ""
    return first or name


def sample_documents(n_docs: int = 24, seed: int = 0) -> list[Document]:
    """`n_docs` topic documents, a seeded sample without repetition (at most all topics)."""
    texts = topic_texts()
    if n_docs > len(texts):
        raise ValueError(f"n_docs={n_docs} > {len(texts)} available pydoc topics")
    names = sorted(random.Random(seed).sample(sorted(texts), n_docs))
    return [
        Document(
            doc_id=f"pydoc/{name}",
            text=texts[name],
            source_path=f"pydoc_data.topics:{name}",
            metadata={"topic": name, "title": topic_title(name, texts[name])},
        )
        for name in names
    ]


def write_sample_corpus(out_dir: str | Path, n_docs: int = 24, seed: int = 0) -> list[Path]:
    """Write `n_docs` topics as files under out_dir (even-indexed .md with a '#' title,
    odd-indexed .txt). Returns the written paths, sorted."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(sample_documents(n_docs, seed)):
        name = str(doc.metadata["topic"])
        if i % 2 == 0:
            path = out / f"{name}.md"
            body = _PARAGRAPH_SPLIT_RE.split(doc.text, maxsplit=1)
            rest = body[1] if len(body) > 1 else ""
            path.write_text(f"# {doc.metadata['title']}\n\n{rest}\n", encoding="utf-8")
        else:
            path = out / f"{name}.txt"
            path.write_text(doc.text + "\n", encoding="utf-8")
        paths.append(path)
    return sorted(paths)


def write_sample_jsonl(path: str | Path, n_docs: int = 24, seed: int = 0) -> Path:
    """Write the sample documents as one .jsonl file (`id`, `text`, `metadata` per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for doc in sample_documents(n_docs, seed):
            f.write(json.dumps({"id": doc.doc_id, "text": doc.text, "metadata": dict(doc.metadata)}) + "\n")
    return path


def topic_passages(min_chars: int = 400, max_chars: int = 1200) -> list[tuple[str, str]]:
    """Cut every topic into passages of whole paragraphs, about [min_chars, max_chars] long.

    Returns [(topic name, passage text)] in topic order. A passage is only shorter than
    min_chars when its topic is; a single paragraph longer than max_chars stays whole.
    """
    passages = []
    for name, text in topic_texts().items():
        current: list[str] = []
        size = 0
        for para in _PARAGRAPH_SPLIT_RE.split(text):
            para = para.strip("\n")
            if not para.strip():
                continue
            if current and size + len(para) > max_chars and size >= min_chars:
                passages.append((name, "\n\n".join(current)))
                current, size = [], 0
            current.append(para)
            size += len(para) + 2
        if current:
            passages.append((name, "\n\n".join(current)))
    return passages
