"""The rendered book, opened the way readers open it: in a real browser.

Serves _build/html on 127.0.0.1, opens every page of _toc.yml in headless
Chromium (Debian's /usr/bin/chromium driven by Playwright; `make browser`
installs it) and checks, per page:

* no console errors and no uncaught page errors, and no request leaves the
  local server (the book must not depend on remote scripts, fonts or images);
* every equation rendered by MathJax (no raw TeX left in the visible text,
  no MathJax error, an mjx-container in every math element);
* every <img> loaded;
* every internal link resolves (200 from the server; anchors exist);
* every chapter page has the "Open in Colab" link for its notebook, derived
  from the repository configured in _config.yml;
* on every chapter page the install cell (the notebook's first cell, which
  Colab needs) is the first cell of the page and its code is collapsed, and
  the solutions of the exercises are collapsed too;

and saves a full-page screenshot of each page to _build/screenshots/<page>.png.

Run after the book build:  .venv/bin/python -m pytest -q tests_book/test_browser.py
Environment: BOOK_CHROMIUM overrides the browser binary (default /usr/bin/chromium).
"""

from __future__ import annotations

import functools
import html.parser
import os
import re
import shutil
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from bookconfig import HTML, SCREENSHOTS, colab_url, is_chapter, source_of, toc_pages

CHROMIUM = os.environ.get("BOOK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE_TIMEOUT_MS = 60_000

PAGES = toc_pages()
CHAPTER_PAGES = [p for p in PAGES if is_chapter(p)]

# Raw TeX that MathJax should have replaced, looked for in the visible text
# outside code: display/inline delimiters, environments, and $...$ holding a
# TeX command (inline math that was never recognised as math).
RAW_TEX = [
    re.compile(r"\$\$"),
    re.compile(r"\\[()\[\]]"),
    re.compile(r"\\begin\{"),
    re.compile(r"\$[^$\n]*\\[A-Za-z]+[^$\n]*\$"),
]
# reStructuredText that Sphinx should have rendered, looked for in the visible text outside code
# of the API reference: inline literals, roles, directives, link targets, and a Google-style
# "Args:" section that napoleon did not turn into a parameter list.
RAW_RST = [
    re.compile(r"``"),
    re.compile(r":[a-z]+(:[a-z]+)?:`"),
    re.compile(r"(^|\n)\s*\.\. [a-z-]+::"),
    re.compile(r"`[^`\n]+`__?\b"),
    re.compile(r"(^|\n)\s*(Keyword )?Args:\s*(\n|$)"),
]
# The API reference: pages whose source documents modules with autodoc (one automodule each).
AUTOMODULE = re.compile(r"^\s*\.\. automodule::\s*(\S+)", re.M)
# Math in the source of a page (markdown or notebook markdown cells).
SOURCE_MATH = re.compile(r"\$\$|\$[^$\n]+\$|\{math\}|\\begin\{|```\{?math")


# ---------------------------------------------------------------- server


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass


@pytest.fixture(scope="module")
def server():
    if not (HTML / "index.html").exists():
        pytest.fail(f"{HTML} has no built book: run `make book` first")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free port
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


# --------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser(server):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no browser at {CHROMIUM}: run `make browser` (installs Debian's chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run `make venv` (it is pinned in requirements.txt)")

    remote: list[str] = []

    def route(route):
        url = route.request.url
        if url.startswith(server + "/") or url == server:
            route.continue_()
        else:
            remote.append(url)
            route.abort()

    profile = tempfile.mkdtemp(prefix="book-chromium-")  # a fresh user-data-dir
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 900},
                service_workers="block",
            )
            try:
                context.route("**/*", route)
                context.set_default_timeout(PAGE_TIMEOUT_MS)
                yield context, remote
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@dataclass
class Visit:
    url: str
    status: int
    console_errors: list[str] = field(default_factory=list)
    cells: dict = field(default_factory=dict)
    remote_requests: list[str] = field(default_factory=list)
    math: dict = field(default_factory=dict)
    images: list[dict] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    screenshot: str = ""
    ids: list[str] = field(default_factory=list)


_MATH_JS = """() => {
  const math = Array.from(document.querySelectorAll('.math'));
  const skip = 'pre, code, script, style, textarea, noscript, mjx-container, .highlight';
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const text = [];
  while (walker.nextNode()) {
    const p = walker.currentNode.parentElement;
    if (p && !p.closest(skip)) text.push(walker.currentNode.textContent);
  }
  return {
    elements: math.length,
    containers: document.querySelectorAll('mjx-container').length,
    unrendered: math.filter(el => !el.querySelector('mjx-container'))
                    .map(el => el.textContent.trim().slice(0, 100)),
    errors: Array.from(document.querySelectorAll('mjx-merror'))
                 .map(el => el.getAttribute('data-mjx-error') || el.textContent)
                 // undefined macros: MathJax's noundefined extension shows them as red text
                 .concat(Array.from(document.querySelectorAll('mjx-assistive-mml mtext'))
                 .map(el => el.textContent).filter(t => t.startsWith('\\\\'))),
    text: text.join('\\n'),
  };
}"""

# The first code cell of the page (is its source visible?) and the exercises' solutions (dropdown
# admonitions: is their body visible before a click?).
_CELLS_JS = """() => {
  const visible = el => {
    if (!el) return false;
    const closed = el.closest('details:not([open])');
    if (closed && !el.matches('summary') && !el.closest('summary')) return false;
    if (el.checkVisibility) return el.checkVisibility({visibilityProperty: true, contentVisibilityAuto: true});
    return el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden';
  };
  const first = document.querySelector('div.cell');
  const input = first && first.querySelector('.cell_input');
  const solutions = Array.from(document.querySelectorAll('.admonition.dropdown'));
  return {
    first_classes: first ? first.className : null,
    first_source: input ? input.textContent : null,
    first_source_visible: visible(input),
    solutions: solutions.length,
    solutions_open: solutions.filter(a => Array.from(a.children).slice(1).some(visible)).length,
  };
}"""

_WAIT_JS = """async () => {
  document.querySelectorAll('img[loading="lazy"]').forEach(img => { img.loading = 'eager'; });
  if (window.MathJax && window.MathJax.startup && window.MathJax.startup.promise) {
    await window.MathJax.startup.promise;
  }
  await document.fonts.ready;
  await Promise.all(Array.from(document.images).map(img => img.complete ? null :
    new Promise(done => { img.addEventListener('load', done); img.addEventListener('error', done); })));
}"""


@pytest.fixture(scope="module")
def visit(server, browser):
    """visit(docname) -> Visit: opens the page once and records everything."""
    context, remote = browser
    cache: dict[str, Visit] = {}

    def _visit(docname: str) -> Visit:
        if docname in cache:
            return cache[docname]
        url = f"{server}/{docname}.html"
        page = context.new_page()
        errors: list[str] = []
        remote.clear()

        def is_local(u: str | None) -> bool:
            return not u or u.startswith(server)

        def on_console(msg):
            if msg.type == "error":
                where = (msg.location or {}).get("url")
                if is_local(where):
                    errors.append(f"console: {msg.text} [{where}]")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
        page.on("requestfailed", lambda req: req.url.startswith(server)
                and errors.append(f"request failed: {req.url} ({req.failure})"))
        page.on("response", lambda resp: resp.url.startswith(server) and resp.status >= 400
                and errors.append(f"HTTP {resp.status}: {resp.url}"))
        try:
            response = page.goto(url, wait_until="load")
            page.evaluate(_WAIT_JS)
            page.wait_for_load_state("networkidle")

            shot = SCREENSHOTS / f"{docname}.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)

            result = Visit(
                url=url,
                status=response.status if response else 0,
                console_errors=list(errors),
                remote_requests=list(remote),
                math=page.evaluate(_MATH_JS),
                images=page.evaluate("""() => Array.from(document.images).map(img => ({
                    src: img.currentSrc || img.src, complete: img.complete,
                    width: img.naturalWidth}))"""),
                links=page.evaluate("""() => Array.from(document.querySelectorAll('a[href]'))
                                             .map(a => a.href)"""),
                screenshot=str(shot),
                cells=page.evaluate(_CELLS_JS),
                ids=page.evaluate("() => Array.from(document.querySelectorAll('[id]')).map(el => el.id)"),
            )
        finally:
            page.close()
        cache[docname] = result
        return result

    return _visit


# ------------------------------------------------------- link resolution


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if value and (key == "id" or (key == "name" and tag == "a")):
                self.ids.add(value)


@functools.cache
def _fetch(url: str) -> tuple[int, str, frozenset]:
    """(status, content type, ids in the document) of a local URL."""
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            ctype = resp.headers.get("Content-Type", "")
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        return err.code, "", frozenset()
    ids: set[str] = set()
    if "html" in ctype:
        parser = _Ids()
        parser.feed(body.decode("utf-8", "replace"))
        ids = parser.ids
    return status, ctype, frozenset(ids)


# ------------------------------------------------------------------ tests


def test_toc_has_pages():
    assert PAGES, "_toc.yml lists no pages"


@pytest.mark.parametrize("docname", PAGES)
def test_page_loads_without_errors(visit, docname):
    v = visit(docname)
    assert v.status == 200, f"{v.url}: HTTP {v.status}"
    assert not v.console_errors, f"{docname}: errors in the browser:\n  " + "\n  ".join(v.console_errors)


@pytest.mark.parametrize("docname", PAGES)
def test_no_remote_requests(visit, docname):
    v = visit(docname)
    assert not v.remote_requests, (
        f"{docname} requests remote resources (the book must work offline; "
        "remove them at the source, e.g. in _config.yml):\n  " + "\n  ".join(v.remote_requests))


@pytest.mark.parametrize("docname", PAGES)
def test_math_rendered(visit, docname):
    v = visit(docname)
    m = v.math
    problems = []
    if m["unrendered"]:
        problems.append(f"{len(m['unrendered'])} math element(s) not rendered by MathJax: {m['unrendered'][:5]}")
    if m["errors"]:
        problems.append(f"MathJax errors: {m['errors'][:5]}")
    for pattern in RAW_TEX:
        hits = [mo.group(0) for mo in pattern.finditer(m["text"])]
        if hits:
            problems.append(f"raw TeX in the visible text, matching {pattern.pattern!r}: {hits[:5]}")
    source = source_of(docname)
    if source is not None and SOURCE_MATH.search(_prose(source)) and not m["containers"]:
        problems.append(f"{source.name} has math but the page shows no MathJax output (mjx-container)")
    assert not problems, f"{docname}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("docname", PAGES)
def test_images_loaded(visit, docname):
    v = visit(docname)
    broken = [img["src"] for img in v.images if not img["complete"] or img["width"] <= 0]
    assert not broken, f"{docname}: images that did not load:\n  " + "\n  ".join(broken)


@pytest.mark.parametrize("docname", PAGES)
def test_internal_links_resolve(server, visit, docname):
    v = visit(docname)
    broken = []
    for href in sorted(set(v.links)):
        if not href.startswith(server + "/"):
            continue  # external (github, colab, arxiv ...) or mailto:/javascript:
        target, _, fragment = href.partition("#")
        status, ctype, ids = _fetch(target)
        if status != 200:
            broken.append(f"{href}: HTTP {status}")
        elif fragment and urllib.parse.unquote(fragment) not in ids:
            broken.append(f"{href}: no element with id {fragment!r} on {target}")
    assert not broken, f"{docname}: broken internal links:\n  " + "\n  ".join(broken)


@pytest.mark.parametrize("docname", CHAPTER_PAGES)
def test_chapter_has_colab_link(visit, docname):
    source = source_of(docname)
    assert source is not None and source.suffix == ".ipynb", (
        f"{docname}: chapters must be notebooks (chapters/<name>.ipynb) to get an Open in Colab link")
    expected = colab_url(docname)
    v = visit(docname)
    colab = [h for h in v.links if "colab.research.google.com" in h]
    assert expected in colab, (
        f"{docname}: no Open in Colab link to {expected}; Colab links on the page: {colab}")


@pytest.mark.parametrize("docname", PAGES)
def test_screenshot_saved(visit, docname):
    v = visit(docname)
    assert os.path.getsize(v.screenshot) > 1000, f"{v.screenshot} is empty"


def _prose(source) -> str:
    """Markdown text of a page (for .ipynb: its markdown cells only)."""
    if source.suffix == ".ipynb":
        import json

        nb = json.loads(source.read_text())
        return "\n".join("".join(c.get("source", "")) for c in nb.get("cells", [])
                         if c.get("cell_type") == "markdown")
    return source.read_text()


@pytest.mark.parametrize("docname", CHAPTER_PAGES)
def test_install_cell_first_and_collapsed(visit, docname):
    cells = visit(docname).cells
    assert cells.get("first_source") and "import bnlib" in cells["first_source"], (
        f"{docname}: the first cell of the page is not the install cell: {cells.get('first_source')!r:.200}")
    assert "tag_hide-input" in (cells.get("first_classes") or ""), (
        f"{docname}: the install cell must carry the tag hide-input (classes: {cells.get('first_classes')})")
    assert not cells["first_source_visible"], f"{docname}: the install cell's code is shown expanded"


@pytest.mark.parametrize("docname", CHAPTER_PAGES)
def test_exercise_solutions_collapsed(visit, docname):
    cells = visit(docname).cells
    assert cells["solutions"] > 0, f"{docname}: no exercise solutions (dropdown admonitions) on the page"
    assert cells["solutions_open"] == 0, (
        f"{docname}: {cells['solutions_open']} of {cells['solutions']} exercise solutions are shown expanded")


def _api_modules(docname: str) -> list[str]:
    source = source_of(docname)
    return AUTOMODULE.findall(source.read_text()) if source is not None else []


API_PAGES = [p for p in PAGES if _api_modules(p)]


def test_toc_has_api_reference():
    assert API_PAGES, "no page of _toc.yml documents bnlib's modules (`.. automodule::` blocks): the API reference"


@pytest.mark.parametrize("docname", API_PAGES)
def test_api_documents_every_exported_name(visit, docname):
    """Every name in the __all__ of each module on the page has its anchor (``module.name``)."""
    import importlib

    ids = set(visit(docname).ids)
    missing = []
    for module in _api_modules(docname):
        names = getattr(importlib.import_module(module), "__all__", None)
        assert names, f"{docname}: {module} has no __all__ (the API page documents what it exports)"
        missing += [f"{module}.{name}" for name in names if f"{module}.{name}" not in ids]
    assert not missing, f"{docname}: exported names without an entry (anchor) on the page:\n  " + "\n  ".join(missing)


@pytest.mark.parametrize("docname", API_PAGES)
def test_api_has_no_raw_rst(visit, docname):
    text = visit(docname).math["text"]
    problems = []
    for pattern in RAW_RST:
        hits = [text[max(0, m.start() - 40):m.end() + 40].replace("\n", " ") for m in pattern.finditer(text)]
        if hits:
            problems.append(f"raw reStructuredText matching {pattern.pattern!r}: {hits[:5]}")
    assert not problems, f"{docname} (fix the docstring):\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("text, raw", [
    ("BatchNorm2d(num_features, eps=1e-05) Applies Batch Normalization over a 4D input.", False),
    ("Parameters: x – the input. Returns: the output (N, C, *).", False),
    ("the shape ``(N, C)`` of x", True),
    ("see :class:`bnlib.BatchNorm2d` for details", True),
    ("see :py:func:`fold_batchnorm`", True),
    ("intro\n.. note:: this was not parsed", True),
    ("the `paper`_ says", True),
    ("Folds BN.\n  Args:\n    model: the model", True),
])
def test_raw_rst_patterns(text, raw):
    """The patterns the API page is checked with, on rendered and unrendered text."""
    assert any(p.search(text) for p in RAW_RST) == raw
