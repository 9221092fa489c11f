"""Parse source files into `Document`s: .txt, .md, .html/.htm, .jsonl, .pdf (pypdf), .docx (python-docx).

Every failure is an `IngestError` whose message names the file (and the byte offset or
line number where that applies). Files are read once as bytes and decoded once, so a
100 MB single-line file costs O(size) time and about 2x its size in memory; .jsonl is
streamed line by line. PDF and DOCX keep the same contract: an encrypted file (one that
needs a password), a file with no text layer (scanned pages, images only) and a corrupt
file are each a clear `IngestError`, raised before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".jsonl", ".pdf", ".docx")
BINARY_FORMATS = ("pdf", "docx")  # read as bytes by `parse_binary` (files on disk and uploads)

# A file whose first bytes hold more than this share of control or undecodable bytes is binary.
_BINARY_SAMPLE_BYTES = 64 * 1024
_MAX_NONTEXT_FRACTION = 0.30
_TEXT_CONTROLS = frozenset("\t\n\r\f\v\b\x1b")
_NUL = b"\x00"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # compound file: password-protected OOXML (or a legacy .doc)
_MAX_DOCX_UNZIPPED_BYTES = 256 << 20  # a zip that inflates past this is refused (zip bomb guard)


class IngestError(ValueError):
    """A source could not be ingested; the message names the file and where it went wrong."""


@dataclass(frozen=True)
class Document:
    """One parsed document.

    `content_hash` is the sha256 hex digest of `text` (UTF-8); metadata does not enter it,
    so a metadata-only change does not invalidate the chunks or their KV.
    """

    doc_id: str
    text: str
    source_path: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    content_hash: str = ""

    def __post_init__(self) -> None:
        if not self.content_hash:
            object.__setattr__(self, "content_hash", content_hash(self.text))

    @property
    def num_chars(self) -> int:
        return len(self.text)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_path(path: str | Path, root: str | Path | None = None) -> list[Document]:
    """Parse a file, or every supported file under a directory (recursive, sorted).

    doc_id of a file is its path relative to `root` (default: the directory argument, or
    the file's own resolved path when a single file is given), in POSIX form. jsonl lines
    take their `id` field, else `<file doc_id>#<line number>`.
    """
    p = Path(path)
    if not p.exists():
        raise IngestError(f"{p}: path does not exist")
    if p.is_dir():
        base = Path(root) if root is not None else p
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES)
        docs: list[Document] = []
        for f in files:
            docs.extend(parse_file(f, _doc_id_for(f, base)))
        return docs
    base_id = _doc_id_for(p, Path(root)) if root is not None else p.resolve().as_posix()
    return parse_file(p, base_id)


def parse_paths(paths: list[str | Path]) -> list[Document]:
    """`parse_path` over several paths; raises on duplicate doc_ids."""
    docs = [d for p in paths for d in parse_path(p)]
    seen: set[str] = set()
    for d in docs:
        if d.doc_id in seen:
            raise IngestError(f"{d.source_path}: duplicate doc_id {d.doc_id!r}")
        seen.add(d.doc_id)
    return docs


def parse_file(path: Path, doc_id: str | None = None) -> list[Document]:
    """Parse one file by suffix. Unsupported suffixes are an `IngestError`."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise IngestError(f"{path}: unsupported file type {suffix!r} (supported: {SUPPORTED_SUFFIXES})")
    if not path.is_file():
        raise IngestError(f"{path}: not a regular file")
    doc_id = doc_id if doc_id is not None else path.resolve().as_posix()
    if suffix == ".jsonl":
        return list(_iter_jsonl(path, doc_id))
    if suffix in (".pdf", ".docx"):
        data = path.read_bytes()
        text, info = parse_binary(data, suffix.lstrip("."), str(path))
        return [Document(doc_id=doc_id, text=text, source_path=str(path), metadata=info)]
    text = _read_text(path)
    meta: dict[str, Any] = {"format": suffix.lstrip("."), "num_bytes": path.stat().st_size}
    if suffix in (".html", ".htm"):
        text, title = html_to_text_and_title(text)
        if not text:
            raise IngestError(f"{path}: HTML holds no visible text")
        if title:
            meta["title"] = title
    return [Document(doc_id=doc_id, text=text, source_path=str(path), metadata=meta)]


def _doc_id_for(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _check_not_binary(path: Path, head: bytes) -> None:
    if b"\x00" in head:
        raise IngestError(f"{path}: binary file (contains NUL bytes at offset {head.index(_NUL)})")
    sample = head[:_BINARY_SAMPLE_BYTES].decode("utf-8", errors="replace")
    if not sample:
        return
    num_bad = sum(1 for c in sample if c == "\ufffd" or (c < " " and c not in _TEXT_CONTROLS))
    if num_bad / len(sample) > _MAX_NONTEXT_FRACTION:
        raise IngestError(f"{path}: binary file ({num_bad}/{len(sample)} non-text characters in its head)")


def _decode(path: Path, data: bytes, base_offset: int = 0, where: str = "") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: invalid UTF-8 at byte offset {base_offset + e.start}{where}: {e.reason}") from None


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if not data or data.isspace():
        raise IngestError(f"{path}: file is empty or whitespace-only")
    _check_not_binary(path, data[:_BINARY_SAMPLE_BYTES])
    if _NUL in data:
        raise IngestError(f"{path}: binary file (contains NUL bytes at offset {data.index(_NUL)})")
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    text = _decode(path, data[bom:] if bom else data, base_offset=bom)
    del data
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise IngestError(f"{path}: file is empty or whitespace-only")
    return text


def _iter_jsonl(path: Path, file_doc_id: str) -> Iterator[Document]:
    num_docs = 0
    offset = 0
    with path.open("rb") as f:
        _check_not_binary(path, f.read(_BINARY_SAMPLE_BYTES))
        f.seek(0)
        for lineno, raw in enumerate(f, start=1):
            line_offset, offset = offset, offset + len(raw)
            if b"\x00" in raw:
                raise IngestError(f"{path}: binary content (NUL byte) on line {lineno}")
            line = _decode(path, raw, line_offset, where=f" (line {lineno})").strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise IngestError(f"{path}: line {lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            yield _jsonl_document(path, file_doc_id, lineno, obj)
            num_docs += 1
    if num_docs == 0:
        raise IngestError(f"{path}: file is empty or whitespace-only (no JSON lines)")


def _jsonl_document(path: Path, file_doc_id: str, lineno: int, obj: Any) -> Document:
    where = f"{path}: line {lineno}"
    if not isinstance(obj, dict):
        raise IngestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text = obj.get("text")
    if not isinstance(text, str):
        raise IngestError(f"{where}: missing string field 'text'")
    if not text.strip():
        raise IngestError(f"{where}: field 'text' is empty or whitespace-only")
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise IngestError(f"{where}: field 'metadata' must be a JSON object")
    raw_id = obj.get("id")
    if raw_id is not None and not isinstance(raw_id, str | int):
        raise IngestError(f"{where}: field 'id' must be a string or integer")
    doc_id = str(raw_id) if raw_id is not None else f"{file_doc_id}#{lineno}"
    meta = {"format": "jsonl", "line": lineno, **metadata}
    return Document(doc_id=doc_id, text=text, source_path=str(path), metadata=meta)


# ---------------------------------------------------------------------------------------
# PDF and DOCX


def _clean_extracted(text: str) -> str:
    """Normalise line ends, drop NULs and trailing blanks, collapse runs of blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    lines = [ln.rstrip() for ln in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def parse_binary(data: bytes, fmt: str, path: str) -> tuple[str, dict[str, Any]]:
    """Text and metadata ({format, num_bytes, ...}) of a PDF or DOCX file's bytes (`fmt` "pdf" or
    "docx"): a file read from disk or uploaded. Errors are `IngestError`s that name `path`."""
    if fmt not in BINARY_FORMATS:
        raise IngestError(f"{path}: unsupported binary format {fmt!r} (supported: {BINARY_FORMATS})")
    text, extra = _read_pdf(data, path) if fmt == "pdf" else _read_docx(data, path)
    return text, {"format": fmt, "num_bytes": len(data), **extra}


def _read_pdf(data: bytes, path: str) -> tuple[str, dict[str, Any]]:
    """Text of every page (pages separated by a blank line) and {num_pages, title?}."""
    import pypdf
    from pypdf.errors import DependencyError, FileNotDecryptedError

    if not data.lstrip()[:5] == b"%PDF-":
        raise IngestError(f"{path}: not a PDF (no %PDF- header)")
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):  # an owner-only password opens with ""
            raise IngestError(f"{path}: encrypted PDF (needs a password); decrypt it before ingesting")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = reader.metadata.title if reader.metadata is not None else None
    except IngestError:
        raise
    except (FileNotDecryptedError, DependencyError) as e:
        raise IngestError(f"{path}: encrypted PDF that cannot be opened without a password ({e})") from None
    except Exception as e:  # pypdf raises many types (PdfReadError, PdfStreamError, KeyError...) on damage
        raise IngestError(f"{path}: corrupt or unreadable PDF ({type(e).__name__}: {e})") from None
    text = "\n\n".join(t for t in (_clean_extracted(p) for p in pages) if t)
    if not text:
        raise IngestError(
            f"{path}: PDF has no text layer ({len(pages)} page(s) of images, e.g. a scan); OCR it before ingesting"
        )
    meta: dict[str, Any] = {"num_pages": len(pages)}
    if isinstance(title, str) and title.strip():
        meta["title"] = title.strip()
    return text, meta


def _read_docx(data: bytes, path: str) -> tuple[str, dict[str, Any]]:
    """Paragraphs and table rows in body order (cells joined by " | "), and {title?}."""
    import zipfile

    import docx
    from docx.opc.exceptions import PackageNotFoundError

    if data[:8] == _OLE_MAGIC:
        raise IngestError(f"{path}: encrypted (password-protected) DOCX or a legacy .doc; save it as plain .docx")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            if sum(i.file_size for i in z.infolist()) > _MAX_DOCX_UNZIPPED_BYTES:
                raise IngestError(f"{path}: DOCX inflates past {_MAX_DOCX_UNZIPPED_BYTES} bytes")
        d = docx.Document(io.BytesIO(data))
        blocks = [_docx_block_text(b) for b in d.iter_inner_content()]
        title = d.core_properties.title
    except IngestError:
        raise
    except (zipfile.BadZipFile, PackageNotFoundError) as e:
        raise IngestError(f"{path}: corrupt DOCX (not a valid Office Open XML package: {e})") from None
    except Exception as e:  # damaged XML parts, missing relationships...
        raise IngestError(f"{path}: corrupt or unreadable DOCX ({type(e).__name__}: {e})") from None
    text = _clean_extracted("\n\n".join(b for b in blocks if b.strip()))
    if not text:
        raise IngestError(f"{path}: DOCX has no text (images only, e.g. a scan); OCR it before ingesting")
    return text, ({"title": title.strip()} if title and title.strip() else {})


def _docx_block_text(block: Any) -> str:
    rows = getattr(block, "rows", None)
    if rows is None:  # a paragraph
        return str(block.text)
    out = []
    for row in rows:
        cells: list[str] = []
        for cell in row.cells:  # a merged cell repeats across the columns it spans: keep it once
            t = " ".join(cell.text.split())
            if not cells or cells[-1] != t:
                cells.append(t)
        out.append(" | ".join(cells))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# HTML


_SKIP_TAGS = frozenset({"script", "style", "noscript", "template", "head", "svg", "iframe", "object"})
_BLOCK_TAGS = frozenset(
    {
        "p", "div", "br", "hr", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "section",
        "article", "header", "footer", "nav", "aside", "main", "blockquote", "pre", "figure",
        "figcaption", "h1", "h2", "h3", "h4", "h5", "h6", "title", "body", "html", "form",
    }
)  # fmt: skip
_BREAK = "\x00"  # paragraph-break marker; NUL never survives in parsed text
_WS_RE = re.compile(r"[ \t\r\n\f\v]+")


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0
        self.title_parts: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        if tag in _SKIP_TAGS:
            self._skip_depth += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append(_BREAK)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append(_BREAK)

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag in _SKIP_TAGS:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append(_BREAK)

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_parts.append(data)
        if self._skip_depth == 0:
            self.parts.append(data.replace(_BREAK, " "))


def html_to_text(html: str) -> str:
    """Visible text of an HTML page: scripts/styles/head dropped, whitespace collapsed inside
    paragraphs, block elements separated by a blank line."""
    return html_to_text_and_title(html)[0]


def html_to_text_and_title(html: str) -> tuple[str, str]:
    """(`html_to_text(html)`, the <title> text or "")."""
    parser = _TextExtractor()
    step = 1 << 20
    for i in range(0, len(html), step):  # bounded feeds keep the parser's buffer small
        parser.feed(html[i : i + step])
    parser.close()
    paragraphs = (_WS_RE.sub(" ", p).strip() for p in "".join(parser.parts).split(_BREAK))
    title = _WS_RE.sub(" ", "".join(parser.title_parts)).strip()
    return "\n\n".join(p for p in paragraphs if p), title
