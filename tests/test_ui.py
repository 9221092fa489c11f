"""The web page (`/ui`) in a real browser: Debian's headless Chromium driven by Playwright's Python API
against a real `redknot serve` on 127.0.0.1 (the server and corpus fixtures of test_server.py).

One server for the whole module and tiny `max_new_tokens`. Browser tests skip with the reason when
Chromium or the `playwright` package is missing. With REDKNOT_UI_SCREENSHOTS=<dir> set, the tests
also save a screenshot of each view there (docs/ holds the committed ones).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import test_server
from test_server import ADMIN, ADMIN_AUTH, KEY, _metric

# The server and corpus fixtures of test_server.py (one module-scoped server for all tests here).
server, client, ingested = test_server.server, test_server.client, test_server.ingested

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HAS_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or not HAS_PLAYWRIGHT,
    reason="browser tests need Debian's `chromium` (apt-get install chromium; .ci/setup does it) and the "
    "`playwright` Python package (the dev extra)"
    + (": chromium is missing" if CHROMIUM is None else "")
    + (": playwright is missing" if not HAS_PLAYWRIGHT else ""),
)
SHOTS = os.environ.get("REDKNOT_UI_SCREENSHOTS")
WAIT_MS = 180_000  # generation on a shared 2-core CPU can be slow; waits end as soon as the page is ready


def wait_js(page, expr: str, timeout_ms: int = 30_000) -> None:
    """Poll a JS expression until truthy. (Playwright's wait_for_function evaluates strings with eval,
    which the page's Content-Security-Policy forbids; page.evaluate goes through the DevTools protocol.)"""
    deadline = time.time() + timeout_ms / 1e3
    while not page.evaluate(expr):
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {expr}")
        time.sleep(0.02)


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"ui-{name}.png"), full_page=True)


# ---- the routes the page adds (no browser needed) --------------------------------------------
def test_page_routes(server, client):
    r = httpx.get(server.url + "/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui"
    page = httpx.get(server.url + "/ui")  # the page's files need no key: they hold no data
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for src in re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text):  # everything it loads is ours
        assert httpx.get(server.url + src).status_code == 200, src
    assert "http" not in "".join(re.findall(r'(?:src|href)="([^"]+)"', page.text))
    assert httpx.get(server.url + "/ui/nope.js").status_code == 404
    assert httpx.get(server.url + "/ui/..%2Fapp.py").status_code == 404
    assert httpx.get(server.url + "/ui/info").status_code == 401  # data routes check the key
    info = client.get("/ui/info").json()
    assert info["policies"][0] == info["reuse_policy"] and "full" in info["policies"]
    prof = client.get("/ui/head_profile").json()
    assert len(prof["classes"]) == prof["num_layers"] and {len(r) for r in prof["classes"]} == {prof["num_kv_heads"]}
    assert prof["num_global"] == sum(map(sum, prof["classes"]))


def test_offered_policies_exist():
    from redknot_rag.reuse import make_policy
    from redknot_rag.server.api_ui import POLICIES

    for name in POLICIES:
        make_policy(name)  # raises for an unknown name


# ---- browser -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, server, *, key: str | None = KEY, **ctx):
    """A fresh tab (its own session storage), with the API key already entered when `key` is given."""
    ctx.setdefault("viewport", {"width": 1200, "height": 900})
    context = browser.new_context(**ctx)
    if key is not None:
        context.add_init_script(f"sessionStorage.setItem('redknot.apiKey', {key!r})")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(server.url + "/")
    page.errors = errors  # uncaught script errors and CSP violations; every test expects none
    return page


@pytest.fixture
def page(browser, server) -> Iterator:
    page = open_page(browser, server)
    yield page
    assert page.errors == [], page.errors
    page.context.close()


def test_namespace_fields_start_at_a_namespace_the_key_sees(page, ingested):
    """With no `default` namespace, the first Ask must not fail with `unknown namespace 'default'` (issue 28):
    the fields start at a namespace the key can read."""
    wait_js(page, "document.querySelector('#policy').options.length > 2")  # /ui/info answered
    assert page.input_value("#namespace") == "test" and page.input_value("#list-namespace") == "test"


def ask(page, question: str, *, max_tokens: int = 8, namespace: str = "test", top_k: int = 2) -> None:
    wait_js(page, "document.querySelector('#policy').options.length > 2")  # /ui/info answered
    page.fill("#question", question)
    page.fill("#namespace", namespace)
    page.fill("#top-k", str(top_k))
    page.fill("#max-tokens", str(max_tokens))
    page.focus("#question")
    page.keyboard.press("Control+Enter")  # the keyboard shortcut submits


def wait_done(page) -> None:
    page.wait_for_selector("#compare:not([disabled])", timeout=WAIT_MS)


def server_query(client: httpx.Client, question: str, **kw) -> dict:
    body = {"question": question, "namespace": "test", "top_k": 2, "max_new_tokens": 8, **kw}
    r = client.post("/query", json=body)
    assert r.status_code == 200, r.text
    return r.json()


@needs_browser
def test_ask_streams_answer_with_sources(page, client, ingested):
    q = "Who built the Varnholt lighthouse?"
    ask(page, q, max_tokens=12)
    # streamed: text shows while the request still runs (Stop still enabled)
    wait_js(
        page,
        "document.querySelector('#answer').textContent.length > 0 && !document.querySelector('#stop').disabled",
        WAIT_MS,
    )
    wait_done(page)
    assert page.inner_text("#ask-status").startswith("Done")
    expected = server_query(client, q, max_new_tokens=12)  # greedy: the same answer without streaming
    assert page.text_content("#answer") == expected["answer"]
    # sources in prompt order: retrieval rank reversed (the best chunk sits next to the question)
    shown = [el.inner_text() for el in page.query_selector_all("#sources li .meta strong")]
    assert shown == [s["doc_id"] for s in reversed(expected["sources"])] and shown[-1] == "lighthouse"
    assert "Varnholt lighthouse was built" in page.inner_text("#sources")
    label = page.get_attribute("#bars .bar", "aria-label")
    policy, _, rest = label.partition(": TTFT")  # the server's default policy (the model's measured one)
    assert policy.startswith("redknot") and rest and "retrieve" in label and "question prefill" in label
    stats = next((expected[k] for k in ("reuse", "reuse_stats", "stats") if k in expected), None)
    if stats and "recomputed_positions" in stats:
        assert "context tokens recomputed" in page.inner_text("#strip-text") and page.is_visible("#strip")
    else:  # the server does not report positions yet: the page says so instead of drawing
        assert "does not report" in page.inner_text("#strip-text") and not page.is_visible("#strip")
    span = page.evaluate("RedKnotUI.findSpan('Built in 1873 by Ida Brask.', ' ida brask.')")
    assert span == [17, 26]
    shot(page, "ask")


@needs_browser
def test_compare_with_full(page, client, ingested):
    q = "When is the Skelmir glacier measured?"
    ask(page, q)
    wait_done(page)
    page.click("#compare")
    page.wait_for_selector("#compare-answers:not([hidden])", timeout=WAIT_MS)
    assert len(page.query_selector_all("#bars .bar-row")) == 2
    assert page.get_attribute("#bars .bar-row:nth-child(2) .bar", "aria-label").startswith("full: TTFT")
    full = server_query(client, q, reuse_policy="full")
    assert page.text_content("#cmp-full") == full["answer"]
    summary = page.inner_text("#compare-summary")
    assert re.search(r"with full prefill: \d+\.\d\dx", summary), summary
    same = page.text_content("#cmp-reuse").strip() == page.text_content("#cmp-full").strip()
    assert ("agree" if same else "differ") in summary
    page.emulate_media(color_scheme="dark")  # the scheme follows the system's
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(15, 17, 21)"
    shot(page, "compare-dark")


@needs_browser
def test_upload_document_and_find_it(page, client):
    page.focus("#tab-ask")
    page.keyboard.press("ArrowRight")  # tabs by keyboard: Ask -> Documents
    assert page.is_visible("#view-docs")
    name, big, ns = "harbour-notes.txt", "depot-ledger.txt", "uploads"
    text = "The Orrin harbour crane lifts 40 tonnes. It was repainted green in 2011."
    # ~2.5k tokens: two KV batches (2048 tokens each), so the bar moves while chunk KV is computed
    ledger = " ".join(f"Record {i}: the depot at site {i} stores {i * 7} crates of item {i % 13}." for i in range(90))
    files = [{"name": n, "mimeType": "text/plain", "buffer": t.encode()} for n, t in ((name, text), (big, ledger))]
    page.set_input_files("#files", files=files[:1])
    page.fill("#upload-namespace", ns)
    page.click("#upload")  # with only the API key: the server answers 403 and the page says why
    page.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
    assert "403" in page.inner_text("#error-text") and "admin key" in page.inner_text("#error-text")
    page.fill("#admin-key", ADMIN)
    page.press("#admin-key", "Enter")
    page.set_input_files("#files", files=files)
    page.click("#upload")
    seen, deadline = set(), time.time() + WAIT_MS / 1e3
    while not page.evaluate("document.querySelector('#upload-status').textContent.startsWith('Ingested')"):
        seen.add(page.evaluate("document.querySelector('#upload-progress').value"))
        assert time.time() < deadline, "upload did not finish"
        time.sleep(0.05)
    assert page.inner_text("#upload-status").startswith("Ingested 2 of 2")
    assert page.get_attribute("#upload-progress", "value") == "2"
    assert any(1 < v < 2 for v in seen), seen  # partway through the second file's chunk KV
    page.wait_for_selector(f"#docs td:text-is('{name}')")
    admin = {"headers": ADMIN_AUTH, "params": {"namespace": ns}}
    assert [d["doc_id"] for d in client.get("/documents", **admin).json()["documents"]] == [big, name]
    assert client.get("/ui/kv_pending", **admin).json() == {"namespace": ns, "chunks": 0, "tokens": 0}
    assert client.get("/ui/kv_pending", params={"namespace": ns}).status_code == 403  # admin only
    shot(page, "documents")
    page.once("dialog", lambda d: d.accept())
    page.click(f"button[aria-label='Delete {name}']")
    wait_js(page, "document.querySelector('#docs-status').textContent.startsWith('1 document ')")
    assert [d["doc_id"] for d in client.get("/documents", **admin).json()["documents"]] == [big]


@needs_browser
def test_upload_pdf_and_docx(page, client):
    """The upload box takes PDF and DOCX: the page sends their bytes and the server extracts the text;
    a corrupt file is refused with the parser's error on the page."""
    from test_documents import DOCX_PARAS, PDF_PAGES, make_docx, make_pdf

    pdf, docx = make_pdf(PDF_PAGES, title="Halvard guide"), make_docx(DOCX_PARAS)
    page.click("#tab-docs")
    page.fill("#admin-key", ADMIN)
    page.press("#admin-key", "Enter")
    page.fill("#upload-namespace", ns := "uploads-bin")
    page.set_input_files("#files", files=[{"name": "broken.pdf", "mimeType": "application/pdf", "buffer": pdf[:200]}])
    page.click("#upload")
    page.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
    assert "broken.pdf" in page.inner_text("#error-text") and "PDF" in page.inner_text("#error-text")
    mime = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
    page.set_input_files("#files", files=[{"name": "guide.pdf", "mimeType": "application/pdf", "buffer": pdf},
                                          {"name": "ferry.docx", "mimeType": mime, "buffer": docx}])  # fmt: skip
    page.click("#upload")
    wait_js(page, "document.querySelector('#upload-status').textContent.startsWith('Ingested')", WAIT_MS)
    assert page.inner_text("#upload-status").startswith("Ingested 2 of 2")
    admin = {"headers": ADMIN_AUTH, "params": {"namespace": ns}}
    docs = {d["doc_id"]: d["metadata"] for d in client.get("/documents", **admin).json()["documents"]}
    assert docs["guide.pdf"]["format"] == "pdf" and docs["guide.pdf"]["title"] == "Halvard guide"
    assert docs["ferry.docx"]["format"] == "docx" and set(docs) == {"guide.pdf", "ferry.docx"}


@needs_browser
def test_wrong_api_key_shows_the_error(browser, server):
    page = open_page(browser, server, key=None)
    try:
        page.wait_for_selector("#key-dialog[open]")  # no key: the page asks for one
        assert "401" in page.inner_text("#error-text")
        page.fill("#api-key", "not-the-key")
        page.click("#key-save")
        wait_js(page, "document.querySelector('#error-text').textContent.includes('invalid API key')")
        assert page.evaluate("sessionStorage.getItem('redknot.apiKey')") == "not-the-key"
        assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []
        page.click("#key-cancel")
        page.fill("#question", "Who built the Varnholt lighthouse?")
        page.evaluate("document.querySelector('#error').hidden = true")
        page.click("#ask")
        page.wait_for_selector("#error:not([hidden])")
        msg = page.inner_text("#error-text")
        assert msg.startswith("401: invalid API key") and "API key" in msg and not page.is_disabled("#ask")
        shot(page, "error")
        assert page.errors == []
    finally:
        page.context.close()


@needs_browser
def test_stop_cancels_on_the_server(page, client, ingested):
    aborted = _metric(
        client.get("/metrics", headers=ADMIN_AUTH).text, 'redknot_request_success_total{finished_reason="abort"}'
    )
    ask(page, "Write a very long story about the lighthouse.", max_tokens=200)
    wait_js(page, "document.querySelector('#answer').textContent.length > 0", WAIT_MS)
    assert client.get("/server_info").json()["num_running"] >= 1  # still generating: something to stop
    page.click("#stop")
    wait_js(page, "document.querySelector('#ask-status').textContent.startsWith('Stopped')")
    deadline = time.time() + 30
    while time.time() < deadline:
        running = client.get("/server_info").json()["num_running"]
        now = _metric(
            client.get("/metrics", headers=ADMIN_AUTH).text, 'redknot_request_success_total{finished_reason="abort"}'
        )
        if running == 0 and now > aborted:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the request was not cancelled on the server (running={running}, aborts {aborted}->{now})")
    assert not page.is_disabled("#ask") and page.is_hidden("#error")


@needs_browser
def test_recomputed_token_strip(page):
    """The strip draws reuse stats of the form /query reports them (`recomputed_positions`, `context_len`)."""
    wait_js(page, "document.querySelector('#policy').options.length > 2")
    page.evaluate("RedKnotUI.renderStrip({reuse: {recomputed_positions: [0, 5, 6], context_len: 10}}, 'redknot')")
    assert page.inner_text("#strip-text").startswith("3 of 10 context tokens recomputed (30.0%)")

    def pixel(at: float) -> list[int]:
        return page.evaluate(
            "(() => { const c = document.querySelector('#strip');"
            f" return [...c.getContext('2d').getImageData(Math.floor(c.width * {at}), 5, 1, 1).data].slice(0, 3); }})()"
        )

    assert pixel(0.55) == [239, 68, 68]  # token 5 of 10: recomputed (--c-recompute)
    assert pixel(0.25) == [208, 215, 222]  # token 2: reused (--line)


@needs_browser
def test_head_profile_heat_map(page, client):
    prof = client.get("/ui/head_profile").json()
    page.focus("#tab-ask")
    page.keyboard.press("End")  # keyboard: the last tab is Heads
    page.wait_for_selector("#heat td")
    cells = page.query_selector_all("#heat td")
    assert len(cells) == prof["num_layers"] * prof["num_kv_heads"]
    letters = [c.inner_text() for c in cells]
    assert letters == ["G" if c else "L" for row in prof["classes"] for c in row]
    page.focus("#heat td[data-l='0'][data-h='0']")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.l + ',' + document.activeElement.dataset.h") == "1,1"
    assert page.inner_text("#head-detail").startswith("layer 1, KV head 1:")
    shot(page, "heads")


@needs_browser
def test_readable_at_200_percent_zoom_and_dark(browser, server):
    """A 600 px wide viewport is a 1200 px window at 200% zoom: no view scrolls sideways."""
    page = open_page(browser, server, viewport={"width": 600, "height": 900}, color_scheme="dark")
    try:
        wait_js(page, "document.querySelector('#policy').options.length > 2")
        for tab in ("ask", "docs", "heads"):
            page.click(f"#tab-{tab}")
            assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth"), tab
        bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert bg == "rgb(15, 17, 21)"  # the dark scheme follows the system setting
        for label in page.query_selector_all("label[for]"):  # every labelled control exists
            assert page.query_selector("#" + label.get_attribute("for")) is not None
        unlabelled = page.evaluate(
            "[...document.querySelectorAll('input,select,textarea')].filter(e => !e.labels.length).map(e => e.id)"
        )
        assert unlabelled == []
        page.click("#tab-ask")
        shot(page, "dark-narrow")
        assert page.errors == []
    finally:
        page.context.close()
