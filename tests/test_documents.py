"""PDF and DOCX ingestion: fixtures written here (a tiny PDF writer, python-docx), parsed, ingested with
chunk KV and queried; encrypted, scanned-only and corrupt files are clear errors that write nothing."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pytest

from redknot_rag.rag import RagService, run_query
from redknot_rag.retrieval.parser import IngestError, parse_path
from redknot_rag.sampling import SamplingParams

PDF_PAGES = [
    ["The Halvard observatory stands on Mount Keth.", "Its main telescope has a 2.4 meter mirror."],
    ["The observatory opens to visitors on the first Saturday of each month."],
]
DOCX_PARAS = ["Ferry schedule", "The Oskby ferry leaves the north pier at 07:15 and returns at 18:40."]


# ---- fixtures -------------------------------------------------------------------------------
def _pdf_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(pages: list[list[str]], *, image_only: bool = False, title: str | None = None) -> bytes:
    """A minimal valid PDF 1.4: one Helvetica text line per string, or (image_only) one 8x8 gray image
    per page and no text operators at all (what a scanner writes)."""
    objs: list[bytes] = []  # object i+1

    def add(body: bytes) -> int:
        objs.append(body)
        return len(objs)

    def stream(dict_extra: bytes, data: bytes) -> bytes:
        return b"<< /Length %d %s >>\nstream\n" % (len(data), dict_extra) + data + b"\nendstream"

    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    pages_id = len(objs) + 2 * len(pages) + (len(pages) if image_only else 0) + 1  # after every page object
    kids = []
    for lines in pages:
        if image_only:
            pixels = zlib.compress(bytes(range(0, 256, 4)))
            img = add(stream(b"/Type /XObject /Subtype /Image /Width 8 /Height 8 /ColorSpace /DeviceGray "
                             b"/BitsPerComponent 8 /Filter /FlateDecode", pixels))  # fmt: skip
            content = add(stream(b"", b"q 400 0 0 400 100 300 cm /Im0 Do Q"))
            res = b"<< /XObject << /Im0 %d 0 R >> >>" % img
        else:
            ops = [b"BT /F1 12 Tf 72 720 Td 16 TL"]
            ops += [b"(" + _pdf_escape(t).encode("latin-1") + b") Tj T*" for t in lines]
            content = add(stream(b"", b"\n".join(ops + [b"ET"])))
            res = b"<< /Font << /F1 %d 0 R >> >>" % font
        kids.append(add(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] /Resources %s /Contents %d 0 R >>"
                        % (pages_id, res, content)))  # fmt: skip
    assert add(b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))) == (
        pages_id
    )
    catalog = add(b"<< /Type /Catalog /Pages %d 0 R >>" % pages_id)
    info = add(b"<< /Title (%s) >>" % _pdf_escape(title).encode()) if title else None
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    trailer = b"/Size %d /Root %d 0 R" % (len(objs) + 1, catalog) + (b" /Info %d 0 R" % info if info else b"")
    out += b"trailer\n<< %s >>\nstartxref\n%d\n%%%%EOF\n" % (trailer, xref)
    return bytes(out)


def encrypt_pdf(data: bytes, user_password: str) -> bytes:
    from pypdf import PdfReader, PdfWriter

    w = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    w.encrypt(user_password=user_password, owner_password="owner", algorithm="AES-128")
    out = io.BytesIO()
    w.write(out)
    return out.getvalue()


def make_docx(paras: list[str], *, table: list[list[str]] | None = None, picture_only: bool = False) -> bytes:
    import docx

    d = docx.Document()
    d.core_properties.title = "Harbour notes"
    if picture_only:
        from PIL import Image

        png = io.BytesIO()
        Image.new("L", (32, 32), 128).save(png, format="PNG")
        png.seek(0)
        d.add_picture(png)
    else:
        d.add_heading(paras[0], level=1)
        for p in paras[1:]:
            d.add_paragraph(p)
        if table:
            t = d.add_table(rows=len(table), cols=len(table[0]))
            for r, row in enumerate(table):
                for c, text in enumerate(row):
                    t.cell(r, c).text = text
    out = io.BytesIO()
    d.save(out)
    return out.getvalue()


def encrypt_docx(data: bytes, password: str) -> bytes:
    msoffcrypto = pytest.importorskip("msoffcrypto", reason="msoffcrypto-tool (dev extra) writes encrypted DOCX")
    from msoffcrypto.format.ooxml import OOXMLFile

    out = io.BytesIO()
    OOXMLFile(io.BytesIO(data)).encrypt(password, out)
    assert msoffcrypto
    return out.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("docs")
    good = make_pdf(PDF_PAGES, title="Halvard guide")
    blobs = {
        "guide.pdf": good,
        "harbour.docx": make_docx(DOCX_PARAS, table=[["Day", "Boats"], ["Monday", "3"]]),
        "locked.pdf": encrypt_pdf(good, "secret"),
        "owner_only.pdf": encrypt_pdf(good, ""),
        "scan.pdf": make_pdf([[""]], image_only=True),
        "truncated.pdf": good[: len(good) // 3],
        "garbage.pdf": b"%PDF-1.4\n" + bytes(range(256)) * 8,
        "notpdf.pdf": b"just some text pretending to be a PDF",
        "picture.docx": make_docx([], picture_only=True),
        "broken.docx": make_docx(DOCX_PARAS)[:500],
        "notzip.docx": b"plain text, not a zip",
    }
    out = {}
    for name, data in blobs.items():
        (d / name).write_bytes(data)
        out[name] = d / name
    return out


# ---- parsing ------------------------------------------------------------------------------------
def test_pdf_text_pages_and_title(files):
    (doc,) = parse_path(files["guide.pdf"])
    for line in (t for page in PDF_PAGES for t in page):
        assert line in doc.text, (line, doc.text)
    assert doc.metadata["format"] == "pdf" and doc.metadata["num_pages"] == 2
    assert doc.metadata["title"] == "Halvard guide"
    (same,) = parse_path(files["owner_only.pdf"])  # empty user password: any viewer opens it
    assert same.text == doc.text


def test_docx_paragraphs_table_and_title(files):
    (doc,) = parse_path(files["harbour.docx"])
    assert doc.text.startswith("Ferry schedule\n\nThe Oskby ferry leaves the north pier at 07:15")
    assert "Day | Boats\nMonday | 3" in doc.text
    assert doc.metadata["format"] == "docx" and doc.metadata["title"] == "Harbour notes"


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("locked.pdf", "encrypted PDF"),
        ("scan.pdf", "no text layer"),
        ("truncated.pdf", "corrupt or unreadable PDF"),
        ("garbage.pdf", "corrupt or unreadable PDF"),
        ("notpdf.pdf", "not a PDF"),
        ("picture.docx", "DOCX has no text"),
        ("broken.docx", "corrupt DOCX"),
        ("notzip.docx", "corrupt DOCX"),
    ],
)
def test_bad_files_are_clear_errors(files, name, needle):
    with pytest.raises(IngestError, match=needle) as e:
        parse_path(files[name])
    assert name in str(e.value)


def test_encrypted_docx_is_a_clear_error(tmp_path):
    p = tmp_path / "locked.docx"
    p.write_bytes(encrypt_docx(make_docx(DOCX_PARAS), "secret"))
    with pytest.raises(IngestError, match="encrypted"):
        parse_path(p)


# ---- ingest and query ---------------------------------------------------------------------------
def test_ingest_and_query_pdf_and_docx(engine, files, tmp_path):
    rag = RagService(engine, tmp_path / "data", "naive")
    s = rag.ingest_paths([files["guide.pdf"], files["harbour.docx"]], "docs")
    assert s.documents == 2 and s.kv_chunks >= 2
    res = run_query(rag, "What size is the Halvard telescope mirror?", top_k=1, namespace="docs",
                    params=SamplingParams(max_new_tokens=8))  # fmt: skip
    assert res.sources[0].doc_id.endswith("guide.pdf") and "2.4 meter" in res.sources[0].text
    assert res.usage["cached_tokens"] > 0
    hits = rag.retrieve("When does the Oskby ferry leave the north pier?", top_k=1, namespace="docs")
    assert hits[0].doc_id.endswith("harbour.docx")
    before = sorted(d["doc_id"] for d in rag.list_documents("docs"))
    kv_before = rag.store.stats().tiers[1].items
    for bad in ("locked.pdf", "scan.pdf", "truncated.pdf", "picture.docx", "broken.docx"):
        with pytest.raises(IngestError):  # a good file next to a bad one: the batch writes nothing
            rag.ingest_paths([files["guide.pdf"], files[bad]], "docs2")
    assert sorted(d["doc_id"] for d in rag.list_documents("docs")) == before
    assert "docs2" not in rag.db.list_namespaces()
    assert rag.store.stats().tiers[1].items == kv_before


# ---- upload over HTTP (what the web page's upload box sends) ------------------------------------
def test_upload_pdf_and_docx_over_http(engine, files, tmp_path):
    """`/ingest` documents with `content_base64` + `format`: the server extracts the text as for a file on
    disk. A bad file, bad base64 or a file over the size limit is refused and writes nothing."""
    import base64

    from fastapi.testclient import TestClient

    from redknot_rag.server.app import create_app
    from redknot_rag.server.runtime import Runtime
    from redknot_rag.server.settings import ServerSettings

    settings = ServerSettings(
        api_key="k",
        admin_key="a",
        max_document_bytes=60_000,
        log_requests=False,
        ingest_root=files["locked.pdf"].parent,
    )
    rag = RagService(engine, tmp_path / "data", "naive")
    admin = {"Authorization": "Bearer a"}

    def doc(name: str, fmt: str | None = None) -> dict:
        b64 = base64.b64encode(files[name].read_bytes()).decode()
        return {"doc_id": name, "content_base64": b64, "format": fmt or name.rsplit(".", 1)[1]}

    with TestClient(create_app(Runtime(engine, settings, rag)), raise_server_exceptions=False) as client:

        def ingest(*docs: dict, status: int, needle: str = "") -> dict:
            r = client.post("/ingest", json={"namespace": "up", "documents": list(docs)}, headers=admin)
            assert r.status_code == status and needle in r.text, (r.status_code, r.text)
            return r.json()

        for bad in ("locked.pdf", "scan.pdf", "truncated.pdf", "picture.docx", "broken.docx", "notzip.docx"):
            ingest(doc("guide.pdf"), doc(bad), status=400, needle=bad)  # the good one is not written either
        ingest(doc("guide.pdf", "docx"), status=400, needle="guide.pdf: corrupt DOCX")
        ingest({"doc_id": "x.pdf", "content_base64": "not base64!", "format": "pdf"}, status=400, needle="base64")
        ingest({"doc_id": "x.pdf", "content_base64": "JVBERg=="}, status=422, needle="format")
        ingest({"doc_id": "x.pdf", "text": "hi", "content_base64": "JVBERg==", "format": "pdf"}, status=422)
        big = base64.b64encode(b"%PDF-" + bytes(60_000)).decode()
        ingest({"doc_id": "big.pdf", "content_base64": big, "format": "pdf"}, status=413, needle="60000 bytes")
        # a text plus a bad file on the server's disk: both are parsed before any write, so neither is written
        body = {
            "namespace": "up",
            "documents": [{"doc_id": "t", "text": "Some text."}],
            "paths": [str(files["locked.pdf"])],
        }
        r = client.post("/ingest", json=body, headers=admin)
        assert r.status_code == 400 and "locked.pdf" in r.text, (r.status_code, r.text)
        assert "up" not in rag.db.list_namespaces()
        meta = {"filename": "guide.pdf"}
        ingest({**doc("guide.pdf"), "metadata": meta}, doc("harbour.docx"), status=200)
        r = client.get("/documents", params={"namespace": "up"}, headers=admin)
        listed = {d["doc_id"]: d["metadata"] for d in r.json()["documents"]}
        assert sorted(listed) == ["guide.pdf", "harbour.docx"]
        assert listed["guide.pdf"] | {"num_bytes": 0} == {"format": "pdf", "num_pages": 2, "title": "Halvard guide",
                                                        "filename": "guide.pdf", "num_bytes": 0}  # fmt: skip
        assert listed["harbour.docx"]["format"] == "docx"
    hits = rag.retrieve("What size is the Halvard telescope mirror?", top_k=1, namespace="up")
    assert hits[0].doc_id == "guide.pdf" and "2.4 meter" in hits[0].text
    hits = rag.retrieve("When does the Oskby ferry leave the north pier?", top_k=1, namespace="up")
    assert hits[0].doc_id == "harbour.docx"
