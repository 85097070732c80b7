"""Build the rendered docs (one HTML page per notebook) into `_site/`, without Quarto.

    .venv/bin/python docs_tools/build_docs.py            # every notebook in nbs/ -> _site/
    .venv/bin/python docs_tools/build_docs.py --force    # ignore the execution cache
    .venv/bin/python docs_tools/build_docs.py --only 01_graph 03_mask_gradients   # a few pages (sidebar still lists all)

Then `docs_tools/check_docs.py` opens every page in headless Chromium. Where Quarto is installed, `nbdev_docs`
builds the Quarto site from `_quarto.yml` as usual; this script is the Quarto-free route to the same pages:

1. nbdev's own notebook processors (`nbdev.processors.FilterDefaults`, what `nbdev_docs` runs before Quarto) turn
   each notebook into its docs form: the `# Title` / `> description` cell becomes the page title, `#| hide` and
   `#| export` cells are dropped, `show_doc` cells are added after exported definitions that have none, and
   nbdev directives are taken out of the code.
2. Where nbdev would execute only the `show_doc` cells, every code cell is executed here (in a fresh process per
   notebook, with execnb's `CaptureShell`, which is what `nbdev_test` runs), skipping the cells `nbdev_test` skips
   (flags in settings.ini's `tst_flags`, e.g. `#| slow`, and `#| eval: false`): the pages show outputs and
   matplotlib figures as executed. A cell that raises stops that notebook (as in `nbdev_test`): its page shows
   the traceback, the build goes on with the other notebooks and exits 1 at the end.
3. The processed notebooks are written as HTML: markdown by markdown-it-py, LaTeX as MathML (latex2mathml; no
   JavaScript or network needed), code highlighted by Pygments, figures as PNG files, a sidebar listing every
   page (nbdev's sidebar order), a table of contents, and links between pages made relative.

Differences from the Quarto route, on purpose: every `show_doc` entry also gets a parameter table (fastcore's
`DocmentTbl`: parameter, type, default, details) under nbdev's signature block; live ipywidgets controls are shown
as static snapshots of the state they were first displayed in (values, labels, images, the figure drawn into an
`Output` widget), labelled as such, because there is no kernel behind a static page.

Executed notebooks are cached in `_proc/docs/` (keyed on the notebook, the package source, settings.ini and this
script), so a rebuild re-runs only what changed. `_site/pages.json` lists every page with what it should show;
check_docs.py asserts against it.
"""
from __future__ import annotations

import argparse, base64, contextlib, hashlib, html, io, json, os, re, shutil, sys, time, traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / "_proc" / "docs"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
SNAPSHOT_NOTE = ("Static snapshot of a live control, as first displayed: open the notebook in Jupyter to move it "
                 "(each move recomputes the result).")

# ---------------------------------------------------------------------------------------------------------------
# Notebook list and page names (as nbdev / Quarto name them)


def notebook_paths(nbs_path: Path):
    "Every notebook nbdev documents, in nbdev's sidebar order (index first)."
    from nbdev.doclinks import nbglob
    files = nbglob(nbs_path, skip_file_re="^[_.]", as_path=True)
    key = lambda p: (p.parent.as_posix(), "00" if p.name.startswith("index.") else p.name)
    return sorted(files, key=key)


def page_name(nb_path: Path, nbs_path: Path) -> str:
    "The page's file name: what nbdev's FrontmatterProc sets as Quarto's output-file (and what _modidx links to)."
    from nbdev.doclinks import _nbpath2html
    return _nbpath2html(nb_path.relative_to(nbs_path)).as_posix()


# ---------------------------------------------------------------------------------------------------------------
# Widgets: static snapshots


def _img_tag(data, fmt: str, width=None, height=None, alt="") -> str:
    if isinstance(data, str): b64 = data.replace("\n", "")
    else: b64 = base64.b64encode(bytes(data)).decode()
    size = (f' width="{int(width)}"' if width else "") + (f' height="{int(height)}"' if height else "")
    return f'<img src="data:image/{fmt};base64,{b64}"{size} alt="{html.escape(alt)}">'


def _bundle_html(data: dict, metadata: dict) -> str:
    "A display bundle as self-contained HTML (images inline): for what a widget holds."
    metadata = metadata or {}
    text = lambda k: "".join(data[k]) if isinstance(data[k], list) else data[k]
    if "text/html" in data: return text("text/html")
    for mime, fmt in (("image/png", "png"), ("image/jpeg", "jpeg")):
        if mime in data:
            m = metadata.get(mime, {}) or {}
            return _img_tag(data[mime], fmt, m.get("width"), m.get("height"), alt="figure")
    if "image/svg+xml" in data: return text("image/svg+xml")
    if "text/plain" in data: return f"<pre>{html.escape(text('text/plain'))}</pre>"
    return ""


def widget_html(w) -> str:
    "Static HTML for widget `w` in its current state: disabled inputs showing the values, images and HTML as they are."
    import ipywidgets as widgets
    layout = getattr(w, "layout", None)
    if layout is not None and (getattr(layout, "display", None) == "none" or getattr(layout, "visibility", None) == "hidden"):
        return ""
    kind = type(w).__name__
    desc = getattr(w, "description", "") or ""
    label = f'<span class="widget-label">{html.escape(desc)}</span>' if desc else ""
    esc = html.escape
    if isinstance(w, widgets.Box):
        direction = "column" if isinstance(w, widgets.VBox) else "row"
        inner = "".join(widget_html(c) for c in w.children)
        return f'<div class="widget-box widget-{direction}" data-widget="{kind}">{inner}</div>'
    if isinstance(w, widgets.FloatLogSlider):
        import math
        exponent = math.log(w.value, w.base) if w.value > 0 else w.min
        readout = format(w.value, w.readout_format) if w.readout_format else f"{w.value:g}"
        return (f'<div class="widget-slider" data-widget="{kind}">{label}<input type="range" disabled min="{w.min}" '
                f'max="{w.max}" step="{w.step}" value="{exponent}" aria-label="{esc(desc)}">'
                f'<span class="widget-readout">{esc(readout)}</span></div>')
    if isinstance(w, (widgets.FloatSlider, widgets.IntSlider, widgets.FloatRangeSlider, widgets.IntRangeSlider)):
        values = w.value if isinstance(w.value, tuple) else (w.value,)
        fmt = getattr(w, "readout_format", "") or ""
        readout = "–".join(format(v, fmt) if fmt else str(v) for v in values)
        return (f'<div class="widget-slider" data-widget="{kind}">{label}<input type="range" disabled min="{w.min}" '
                f'max="{w.max}" step="{w.step}" value="{values[0]}" aria-label="{esc(desc)}">'
                f'<span class="widget-readout">{esc(readout)}</span></div>')
    if isinstance(w, (widgets.HTML, widgets.HTMLMath)):
        return f'<div class="widget-html" data-widget="{kind}">{label}{w.value}</div>'
    if isinstance(w, widgets.Label):
        return f'<span class="widget-text" data-widget="{kind}">{esc(w.value)}</span>'
    if isinstance(w, widgets.Image):
        if not w.value: return ""
        fmt = {"svg+xml": "svg+xml"}.get(w.format, w.format)
        return f'<div class="widget-image" data-widget="{kind}">{_img_tag(w.value, fmt, w.width or None, w.height or None, alt=desc or "figure")}</div>'
    if isinstance(w, widgets.Output):
        parts = []
        for out in w.outputs:
            if out.get("output_type") == "stream": parts.append(f"<pre>{esc(''.join(out.get('text', '')))}</pre>")
            else: parts.append(_bundle_html(out.get("data", {}), out.get("metadata", {})))
        return f'<div class="widget-output" data-widget="{kind}">{"".join(parts)}</div>'
    if isinstance(w, (widgets.Checkbox, widgets.ToggleButton)):
        return (f'<label class="widget-check" data-widget="{kind}"><input type="checkbox" disabled'
                f'{" checked" if w.value else ""}> {esc(desc)}</label>')
    if isinstance(w, widgets.Button):
        return f'<button class="widget-button" disabled data-widget="{kind}">{esc(desc)}</button>'
    if isinstance(w, (widgets.IntProgress, widgets.FloatProgress)):
        return f'<div class="widget-progress" data-widget="{kind}">{label}<progress value="{w.value - w.min}" max="{w.max - w.min}"></progress></div>'
    if hasattr(w, "options") and hasattr(w, "index"):  # dropdowns, selects, radio buttons, toggle buttons
        chosen = w.index if isinstance(w.index, tuple) else (w.index,)
        opts = "".join(f'<option{" selected" if i in chosen else ""}>{esc(str(lbl))}</option>' for i, lbl in enumerate(w._options_labels))
        return f'<div class="widget-select" data-widget="{kind}">{label}<select disabled>{opts}</select></div>'
    if isinstance(getattr(w, "value", None), (str, int, float)):
        return f'<div class="widget-value" data-widget="{kind}">{label}<input disabled value="{esc(str(w.value))}"></div>'
    return f'<code class="widget-other" data-widget="{kind}">{esc(repr(w))}</code>'


def snapshot_widgets(cell):
    "Replace the cell's widget views by static snapshots of the widgets' state now; drop views of closed widgets."
    from ipywidgets.widgets.widget import _instances
    kept = []
    for out in cell.get("outputs", []) or []:
        data = out.get("data")
        if out.get("output_type") in ("display_data", "execute_result") and not data: continue  # nothing to show
        if data and WIDGET_MIME in data:
            w = _instances.get(data[WIDGET_MIME].get("model_id"))
            if w is None: continue  # closed before the cell ended (e.g. a finished progress bar): a notebook shows nothing
            snap = (f'<div class="widget-snapshot" data-widget="{type(w).__name__}">'
                    f'<p class="widget-snapshot-note">{html.escape(SNAPSHOT_NOTE)}</p>{widget_html(w)}</div>')
            out["data"] = {"text/html": snap, "text/plain": data.get("text/plain", "")}
            out.setdefault("metadata", {})["docs_widget_snapshot"] = True
        kept.append(out)
    if "outputs" in cell: cell["outputs"] = kept


def route_output_widgets(shell):
    """Send what is displayed inside `with output_widget:` into that widget, as a Jupyter kernel does.

    Without a kernel, ipywidgets' `Output` lets such displays through to the cell; the snapshot of the `Output`
    would then be empty and the figure would stand outside its control."""
    import ipywidgets
    from IPython.core.displaypub import DisplayPublisher
    stack = []

    class OutputWidgetPublisher(DisplayPublisher):
        def __init__(self, widget): super().__init__(); self.widget = widget
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
            self.widget.outputs = self.widget.outputs + ({"output_type": "display_data", "data": data, "metadata": metadata or {}},)
        def clear_output(self, wait=False): self.widget.outputs = ()

    def enter(self):
        stack.append(shell.display_pub)
        shell.display_pub = OutputWidgetPublisher(self)
        return self

    def exit(self, etype, evalue, tb):
        shell.display_pub = stack.pop()
        return None  # exceptions go on to the cell, as without the widget

    ipywidgets.Output.__enter__, ipywidgets.Output.__exit__ = enter, exit


# ---------------------------------------------------------------------------------------------------------------
# show_doc: nbdev's entry plus a parameter table


def patch_show_doc():
    "Have `show_doc` add a parameter table (fastcore's DocmentTbl) under nbdev's signature, and fix its source link."
    import nbdev.showdoc as showdoc
    from fastcore.docments import DocmentTbl
    from nbdev.doclinks import _get_exps
    if getattr(showdoc.BasicMarkdownRenderer, "_docs_tools_patched", False): return
    plain = showdoc.BasicMarkdownRenderer._repr_markdown_

    def _repr_markdown_(self):
        md = plain(self)
        if "#LNone)" in md:  # nbdev 2.4.14 looks the line up by the qualified name; the module index has bare names
            line = None
            m = re.search(r"\((https?://[^)]*?/blob/[^/)]+/([^)#]+))#LNone\)", md)
            if m:
                qual = getattr(self, "fn", "") or ""
                mod = m.group(2)[:-3].replace("/", ".") if m.group(2).endswith(".py") else ""
                line = _get_exps(m.group(2)).get(qual[len(mod) + 1:] if qual.startswith(mod + ".") else qual)
            md = md.replace("#LNone)", f"#L{line})" if line else ")")
        try: table = DocmentTbl(self.sym)._repr_markdown_()
        except Exception: table = ""
        return md + (f"\n\n{table}" if table else "")

    showdoc.BasicMarkdownRenderer._repr_markdown_ = _repr_markdown_
    showdoc.BasicMarkdownRenderer._docs_tools_patched = True


# ---------------------------------------------------------------------------------------------------------------
# Executing and processing one notebook (in a worker process)


def _cache_key(nb_path: Path) -> str:
    "What an executed notebook depends on: itself, the package, settings.ini and the code that executes it."
    import inspect
    digest = hashlib.sha256()
    for f in (process_notebook, snapshot_widgets, widget_html, _bundle_html, _img_tag, route_output_widgets, patch_show_doc):
        digest.update(inspect.getsource(f).encode())
    files = [nb_path, ROOT / "settings.ini"]
    files += sorted(p for p in (ROOT / "circuit_nb").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for f in files:
        digest.update(f.name.encode()); digest.update(f.read_bytes())
    return digest.hexdigest()


def process_notebook(nb_path: str, force: bool = False) -> dict:
    "Execute and process one notebook; write the result to the cache; return its record (and timing)."
    nb_path = Path(nb_path)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    out_nb, out_rec = CACHE_DIR / f"{nb_path.stem}.ipynb", CACHE_DIR / f"{nb_path.stem}.json"
    key = _cache_key(nb_path)
    if not force and out_rec.exists() and out_nb.exists():
        rec = json.loads(out_rec.read_text())
        if rec.get("key") == key and rec.get("ok"):
            return {**rec, "cached": True}

    os.environ.update(IN_TEST="1", CIRCUIT_NB_PROGRESS=os.environ.get("CIRCUIT_NB_PROGRESS", "0"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from execnb.nbio import write_nb
    from execnb.shell import CaptureShell
    from nbdev.config import get_config
    from nbdev.process import NBProcessor, Processor
    from nbdev.processors import FilterDefaults, exec_show_docs, strip_ansi, filter_stream_, insert_warning

    cfg = get_config()
    skip_flags = set(cfg.get("tst_flags", "").split())
    state = dict(failed=None, timings=[])
    patch_show_doc()

    class exec_all(Processor):
        "Execute every code cell nbdev_test would, in order; stop at the first error; snapshot widgets."
        def begin(self):
            self.shell = CaptureShell(nb_path)
            route_output_widgets(self.shell)
            self.shell.run_cell("from nbdev.showdoc import show_doc")  # as nbdev's exec_show_docs: for the show_doc cells it adds

        def cell(self, cell):
            if cell.cell_type != "code": return
            directives = getattr(cell, "directives_", {}) or {}
            reason = None
            if state["failed"] is not None: reason = "an earlier cell failed"
            elif "nbdev_export(" in cell.source: reason = "export call"
            elif directives.get("eval:", [""])[0].lower() == "false": reason = "eval: false"
            elif skip_flags & directives.keys(): reason = "#| " + " ".join(sorted(skip_flags & directives.keys()))
            if reason:
                cell.metadata["docs_not_run"] = reason
                return
            cell_started = time.time()
            self.shell.cell(cell)
            state["timings"].append((round(time.time() - cell_started, 1), cell.idx_, cell.source.strip().splitlines()[-1][:70] if cell.source.strip() else ""))
            snapshot_widgets(cell)
            if self.shell.exc is not None:
                state["failed"] = dict(cell=cell.idx_, error="".join(traceback.format_exception_only(type(self.shell.exc), self.shell.exc)).strip(),
                                       source=cell.source[:400])

    procs = []
    for p in FilterDefaults().procs():
        if p is exec_show_docs: procs += [exec_all, strip_ansi, filter_stream_]  # run after executing, not before
        elif p in (strip_ansi, filter_stream_, insert_warning): continue
        else: procs.append(p)

    started = time.time()
    cwd = os.getcwd()
    os.chdir(nb_path.parent)
    try:
        proc = NBProcessor(nb_path, procs=procs)
        proc.nb.path_ = str(nb_path)
        # what escapes the shell's capture (IPython re-formatting a displayed result) would only clutter the build log
        with contextlib.redirect_stdout(io.StringIO()): proc.process()
    finally: os.chdir(cwd)
    nb = proc.nb
    fm = dict(getattr(nb, "frontmatter_", {}) or {})
    nb.cells = [c for c in nb.cells if not (c.cell_type == "raw" and c.source.lstrip().startswith("---"))]  # frontmatter
    for c in nb.cells:  # processing attributes that are not notebook format
        for attr in [k for k in c if k.endswith("_")]: del c[attr]
    write_nb(nb, out_nb)
    rec = dict(notebook=nb_path.name, key=key, ok=state["failed"] is None, failed=state["failed"],
               title=str(fm.get("title", nb_path.stem)), description=str(fm.get("description", "")),
               seconds=round(time.time() - started, 1), slowest_cells=sorted(state["timings"], reverse=True)[:3])
    out_rec.write_text(json.dumps(rec, indent=1))
    return {**rec, "cached": False}


# ---------------------------------------------------------------------------------------------------------------
# HTML


def _pandoc_id(text: str) -> str:
    "The identifier pandoc (so Quarto) gives a heading: what nbdev's _modidx links to, e.g. `graph.html#patchable_model`."
    s = "".join(ch for ch in text.strip() if ch.isalnum() or ch in "_-. " or ch.isspace())
    s = re.sub(r"\s+", "-", s).lower()
    s = re.sub(r"^[^a-z]+", "", s)
    return s or "section"


class PageWriter:
    "Turns one processed notebook into HTML, with markdown, math, highlighting, figures as files and page-wide ids."

    def __init__(self, site: Path, page: str, pages_by_nb: dict, doc_url: str):
        from markdown_it import MarkdownIt
        from mdit_py_plugins.dollarmath import dollarmath_plugin
        self.site, self.page, self.pages_by_nb, self.doc_url = site, page, pages_by_nb, doc_url.rstrip("/") + "/"
        self.ids, self.toc, self.n_images, self.n_math, self.math_failures = set(), [], 0, 0, []
        self.md = (MarkdownIt("commonmark", {"html": True, "highlight": self.highlight})
                   .enable("table").enable("strikethrough")
                   .use(dollarmath_plugin, allow_space=True, allow_digits=True, double_inline=True))
        def math_rule(renderer, tokens, idx, options, env): return self._render_math(tokens[idx])  # markdown-it binds it to the renderer
        for rule in ("math_inline", "math_inline_double", "math_block", "math_block_label"):
            self.md.add_render_rule(rule, math_rule)

    # -- pieces
    def highlight(self, code: str, lang: str, attrs=None) -> str:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import get_lexer_by_name
        from pygments.util import ClassNotFound
        try: lexer = get_lexer_by_name(lang or "text")
        except ClassNotFound: lexer = get_lexer_by_name("text")
        body = highlight(code, lexer, HtmlFormatter(nowrap=True))
        return f'<pre class="sourceCode {html.escape(lang or "text")} highlight"><code>{body}</code></pre>'

    def _render_math(self, tok):
        from latex2mathml.converter import convert
        block = tok.type.startswith("math_block") or tok.type == "math_inline_double"
        self.n_math += 1
        try: mathml = convert(tok.content, display="block" if block else "inline")
        except Exception as e:
            self.math_failures.append(f"{tok.content[:60]!r}: {e}")
            return f'<code class="math-fallback">{html.escape(tok.content)}</code>'
        return f'<div class="math display">{mathml}</div>' if tok.type.startswith("math_block") else mathml

    def new_id(self, text: str) -> str:
        base = _pandoc_id(text)
        ident, n = base, 0
        while ident in self.ids: n += 1; ident = f"{base}-{n}"
        self.ids.add(ident)
        return ident

    def fix_href(self, href: str) -> str:
        "Links to the published site or to notebooks become relative links between the pages built here."
        if href.startswith(self.doc_url): href = href[len(self.doc_url):]
        path, hash_, frag = href.partition("#")
        if not re.match(r"^[a-z]+:", path) and path.endswith(".ipynb"):
            path = self.pages_by_nb.get(Path(path).name, path)
        return path + hash_ + frag

    def markdown(self, text: str) -> str:
        # pandoc link attributes, e.g. nbdev's [source](url){target="_blank" style="..."}
        text = re.sub(r'\[([^\]\n]+)\]\(([^)\s]+)\)\{([^}\n]*)\}',
                      lambda m: f'<a href="{html.escape(m.group(2))}" {m.group(3)}>{m.group(1)}</a>', text)
        tokens = self.md.parse(text)
        for i, tok in enumerate(tokens):
            if tok.type == "heading_open":
                inline = tokens[i + 1]
                plain = "".join(c.content for c in (inline.children or []) if c.type in ("text", "code_inline", "math_inline"))
                ident = self.new_id(plain)
                tok.attrSet("id", ident)
                if tok.tag in ("h2", "h3"): self.toc.append((tok.tag, ident, plain))
            for t in [tok, *(tok.children or [])]:
                if t.type == "link_open": t.attrSet("href", self.fix_href(t.attrGet("href") or ""))
        return self.md.renderer.render(tokens, self.md.options, {})

    def image(self, data, fmt: str, metadata: dict) -> str:
        self.n_images += 1
        name = f"figures/{Path(self.page).stem}-{self.n_images}.{fmt}"
        (self.site / name).parent.mkdir(parents=True, exist_ok=True)
        raw = base64.b64decode("".join(data) if isinstance(data, list) else data)
        (self.site / name).write_bytes(raw)
        width = (metadata or {}).get("width")
        return f'<img src="{name}" alt="figure {self.n_images}"{f" width={int(width)}" if width else ""}>'

    @staticmethod
    def terminal_text(text: str) -> str:
        "What a terminal would show: ANSI codes removed, each line as left by its last carriage return."
        text = re.sub(r"\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])", "", text)
        lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
        return "\n".join(lines)

    def output(self, out: dict, asis: bool) -> str:
        kind = out.get("output_type")
        join = lambda v: "".join(v) if isinstance(v, list) else (v or "")
        if kind == "stream":
            text = self.terminal_text(join(out.get("text")))
            if not text.strip(): return ""
            return f'<div class="cell-output cell-output-{out.get("name", "stdout")}"><pre>{html.escape(text)}</pre></div>'
        if kind == "error":
            text = self.terminal_text("".join(out.get("traceback", [])) or f"{out.get('ename')}: {out.get('evalue')}")
            return f'<div class="cell-output cell-output-error"><pre>{html.escape(text)}</pre></div>'
        data, meta = out.get("data", {}) or {}, out.get("metadata", {}) or {}
        if "text/html" in data:
            cls = " widget-output-snapshot" if meta.get("docs_widget_snapshot") else ""
            return f'<div class="cell-output cell-output-display{cls}">{join(data["text/html"])}</div>'
        for mime, fmt in (("image/png", "png"), ("image/jpeg", "jpeg")):
            if mime in data:
                return f'<div class="cell-output cell-output-display">{self.image(data[mime], fmt, meta.get(mime, {}))}</div>'
        if "image/svg+xml" in data:
            self.n_images += 1
            return f'<div class="cell-output cell-output-display">{join(data["image/svg+xml"])}</div>'
        if "text/markdown" in data:
            body = self.markdown(join(data["text/markdown"]))
            return body if asis else f'<div class="cell-output cell-output-display">{body}</div>'
        if "text/latex" in data: return f'<div class="cell-output cell-output-display">{self.markdown(join(data["text/latex"]))}</div>'
        if "text/plain" in data:
            return f'<div class="cell-output cell-output-display"><pre>{html.escape(self.terminal_text(join(data["text/plain"])))}</pre></div>'
        return ""

    def code_cell(self, cell) -> tuple[str, dict]:
        "HTML for a code cell, honouring the Quarto cell options nbdev leaves in the source (echo, output, include, code-fold)."
        lines = cell.get("source", "")
        lines = ("".join(lines) if isinstance(lines, list) else lines).splitlines()
        opts = {}
        while lines and re.match(r"^\s*#\|", lines[0]):
            m = re.match(r"^\s*#\|\s*([\w-]+)\s*:\s*(.*?)\s*$", lines.pop(0))
            if m: opts[m.group(1)] = m.group(2).strip("\"'")
        source = "\n".join(lines).strip("\n")
        is_showdoc = bool(re.match(r"^show_doc\(", source))
        info = dict(showdoc=is_showdoc, tables=0, name=None)
        if opts.get("include") == "false": return "", info
        parts = []
        not_run = cell.get("metadata", {}).get("docs_not_run")
        if opts.get("echo") != "false" and source:
            code = self.highlight(source, "python")
            fold = opts.get("code-fold")
            if fold in ("true", "show"):
                summary = html.escape(opts.get("code-summary", "Code"))
                code = f'<details class="code-fold"{" open" if fold == "show" else ""}><summary>{summary}</summary>{code}</details>'
            parts.append(code)
            if not_run and not_run != "export call":
                parts.append(f'<p class="cell-not-run">Not run for these docs ({html.escape(not_run)}).</p>')
        if opts.get("output") != "false":
            asis = opts.get("output") == "asis"
            for out in cell.get("outputs", []) or []:
                parts.append(self.output(out, asis))
        body = "".join(parts)
        if not body.strip(): return "", info
        if is_showdoc:
            m = re.search(r'<h[1-6] id="([^"]+)"', body)
            info["name"] = m.group(1) if m else None
            info["tables"] = body.count("<table")
            return f'<section class="api-entry" data-api="{html.escape(info["name"] or "")}">{body}</section>', info
        return f'<div class="cell">{body}</div>', info


def _toc_html(toc) -> str:
    if not toc: return ""
    items = "".join(f'<li class="toc-{tag}"><a href="#{ident}">{html.escape(text)}</a></li>' for tag, ident, text in toc)
    return f'<nav id="toc" aria-label="On this page"><h2>On this page</h2><ul>{items}</ul></nav>'


def render_page(site: Path, rec: dict, pages: list, cfg, doc_url: str) -> dict:
    "Write one page; return what it shows (for pages.json)."
    from execnb.nbio import read_nb
    nb = read_nb(CACHE_DIR / f"{Path(rec['notebook']).stem}.ipynb")
    pages_by_nb = {p["notebook"]: p["page"] for p in pages}
    w = PageWriter(site, rec["page"], pages_by_nb, doc_url)
    body, n_api, n_tables, api_names, n_widgets, n_errors = [], 0, 0, [], 0, 0
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            src = cell.source if isinstance(cell.source, str) else "".join(cell.source)
            if src.strip(): body.append(f'<div class="cell cell-markdown">{w.markdown(src)}</div>')
        elif cell.cell_type == "code":
            chunk, info = w.code_cell(cell)
            if info["showdoc"] and chunk:
                n_api += 1; n_tables += info["tables"] > 0; api_names.append(info["name"])
            n_widgets += chunk.count('class="widget-snapshot"')
            n_images_in_widgets = chunk.count('<img src="data:')
            w.n_images += n_images_in_widgets
            n_errors += chunk.count("cell-output-error")
            body.append(chunk)
    if not rec["ok"]:
        f = rec["failed"]
        body.insert(0, f'<div class="build-error" role="alert"><strong>This notebook failed while the docs were built</strong> '
                       f'(cell {f["cell"]}: {html.escape(f["error"])}); outputs after that cell are missing.</div>')
    idx = next(i for i, p in enumerate(pages) if p["page"] == rec["page"])
    sidebar = "".join(
        f'<li><a href="{p["page"]}"{" class=active aria-current=page" if p["page"] == rec["page"] else ""}>{html.escape(p["title"])}</a></li>'
        for p in pages)
    prev_next = ""
    if idx > 0: prev_next += f'<a class="prev" href="{pages[idx - 1]["page"]}">← {html.escape(pages[idx - 1]["title"])}</a>'
    if idx + 1 < len(pages): prev_next += f'<a class="next" href="{pages[idx + 1]["page"]}">{html.escape(pages[idx + 1]["title"])} →</a>'
    site_title = html.escape(cfg.get("title", cfg.lib_name))
    title = html.escape(rec["title"])
    desc = f'<div class="description">{html.escape(rec["description"])}</div>' if rec["description"] else ""
    doc = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} – {site_title}</title>
<meta name="description" content="{html.escape(rec['description'])}">
<link rel="icon" href="data:,">
<link rel="stylesheet" href="site.css">
<link rel="stylesheet" href="styles.css">
</head>
<body>
<header class="navbar"><a class="site-title" href="index.html">{site_title}</a>
<span class="site-description">{html.escape(cfg.get('description', ''))}</span>
<a class="repo" href="{html.escape(cfg.get('git_url', ''))}">source on GitHub</a></header>
<div class="layout">
<nav id="sidebar" aria-label="Pages"><ul>{sidebar}</ul></nav>
<main id="content">
<header id="title-block"><h1 class="title">{title}</h1>{desc}</header>
{''.join(body)}
<footer class="page-nav">{prev_next}</footer>
</main>
{_toc_html(w.toc)}
</div>
</body>
</html>
"""
    (site / rec["page"]).write_text(doc, encoding="utf-8")
    return dict(page=rec["page"], notebook=rec["notebook"], title=rec["title"], description=rec["description"],
                ok=rec["ok"], failed=rec["failed"], api_entries=n_api, api_tables=n_tables, api_names=api_names,
                images=w.n_images, widgets=n_widgets, error_outputs=n_errors, math=w.n_math,
                math_failures=w.math_failures, seconds=rec["seconds"], cached=rec.get("cached", False))


SITE_CSS = """
:root { --sidebar: 15rem; --toc: 14rem; --accent: #2780e3; }
* { box-sizing: border-box; }
body { margin: 0; font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       line-height: 1.55; color: #212529; background: #fff; }
a { color: var(--accent); }
.navbar { display: flex; align-items: baseline; gap: 1rem; padding: .6rem 1.2rem; background: var(--accent); color: #fff; }
.navbar a { color: #fff; text-decoration: none; } .navbar .site-title { font-weight: 600; font-size: 1.2rem; }
.navbar .site-description { opacity: .85; font-size: .9rem; flex: 1; } .navbar .repo { font-size: .9rem; }
.layout { display: grid; grid-template-columns: var(--sidebar) minmax(0, 1fr) var(--toc); gap: 1.5rem; max-width: 90rem; margin: 0 auto; }
#sidebar { position: sticky; top: 0; align-self: start; max-height: 100vh; overflow-y: auto; padding: 1rem .5rem 1rem 1rem; font-size: .92rem; }
#sidebar ul { list-style: none; margin: 0; padding: 0; } #sidebar li { margin: .15rem 0; }
#sidebar a { display: block; padding: .2rem .5rem; border-radius: .25rem; text-decoration: none; color: #343a40; }
#sidebar a.active { background: #e7f1fc; color: var(--accent); font-weight: 600; }
#toc { position: sticky; top: 0; align-self: start; max-height: 100vh; overflow-y: auto; padding: 1rem 1rem 1rem 0; font-size: .85rem; }
#toc h2 { font-size: .9rem; margin: 0 0 .4rem; } #toc ul { list-style: none; padding: 0; margin: 0; }
#toc li.toc-h3 { padding-left: .8rem; } #toc a { color: #495057; text-decoration: none; }
main { min-width: 0; padding: 1rem 0 3rem; }
#title-block h1 { margin: .3rem 0 .2rem; font-size: 2.2rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #dee2e6; padding-bottom: .2rem; } h3 { margin-top: 1.6rem; }
pre { background: #f7f7f7; padding: .6rem .8rem; border-radius: .25rem; overflow-x: auto; font-size: .85rem; line-height: 1.4; }
code { font-family: SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; font-size: .88em; }
p code, li code, td code { background: #f3f3f3; padding: .05rem .25rem; border-radius: .2rem; color: #7d12ba; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; display: block; overflow-x: auto; }
th, td { border: 1px solid #dee2e6; padding: .3rem .6rem; text-align: left; vertical-align: top; } th { background: #f8f9fa; }
img { max-width: 100%; height: auto; }
.cell-output-stderr pre { background: #fff4f4; } .cell-output-error pre { background: #fde8e8; color: #8a1c1c; }
.cell-not-run { font-size: .8rem; color: #6c757d; margin: -.6rem 0 .8rem; font-style: italic; }
.build-error { background: #fde8e8; border: 1px solid #f1aeb5; padding: .8rem 1rem; border-radius: .3rem; }
details.code-fold > summary { cursor: pointer; color: #6c757d; font-size: .9rem; }
section.api-entry { margin: 1.2rem 0; }
section.api-entry hr { border: 0; border-top: 1px solid #dee2e6; }
.math.display { overflow-x: auto; margin: .8rem 0; } math[display="block"] { font-size: 1.1em; }
.widget-snapshot { border: 1px dashed #adb5bd; border-radius: .3rem; padding: .6rem .8rem; margin: .5rem 0; }
.widget-snapshot-note { font-size: .8rem; color: #6c757d; margin: 0 0 .4rem; font-style: italic; }
.widget-box { display: flex; gap: .6rem; } .widget-column { flex-direction: column; } .widget-row { flex-direction: row; flex-wrap: wrap; }
.widget-slider, .widget-select, .widget-value, .widget-progress { display: flex; align-items: center; gap: .5rem; font-size: .9rem; }
.widget-label { min-width: 6rem; text-align: right; color: #495057; } .widget-readout { font-family: monospace; }
.page-nav { display: flex; justify-content: space-between; margin-top: 3rem; padding-top: 1rem; border-top: 1px solid #dee2e6; }
@media (max-width: 70rem) { .layout { grid-template-columns: var(--sidebar) minmax(0, 1fr); } #toc { display: none; } }
"""


def build(out: Path, only=None, force=False, workers=None) -> int:
    from fastcore.basics import num_cpus
    from nbdev.config import get_config
    from pygments.formatters import HtmlFormatter
    cfg = get_config()
    nbs_path = Path(cfg.nbs_path)
    notebooks = notebook_paths(nbs_path)
    if only:
        wanted = {Path(o).stem for o in only}
        missing = wanted - {p.stem for p in notebooks}
        if missing: sys.exit(f"no notebook named {sorted(missing)} in {nbs_path}")
    to_run = [p for p in notebooks if not only or p.stem in wanted]
    workers = workers or int(os.environ.get("CIRCUIT_NB_DOCS_WORKERS", min(2, num_cpus() or 1)))
    started = time.time()
    print(f"executing {len(to_run)} notebook(s) with {workers} worker(s)", flush=True)
    records = {}
    # the longest notebooks first, so two workers finish together
    order = sorted(to_run, key=lambda p: -p.stat().st_size)
    # workers are reused (as nbdev_test's are): torch and transformer_lens are imported once per worker, not per notebook
    with ProcessPoolExecutor(max_workers=workers, mp_context=__import__("multiprocessing").get_context("spawn")) as pool:
        # by module name, not __main__: IPython's shell replaces the worker's __main__ while it runs a notebook
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import build_docs
        futures = {pool.submit(build_docs.process_notebook, str(p), force): p for p in order}
        for fut in as_completed(futures):
            p = futures[fut]
            try: rec = fut.result()
            except Exception as e:  # the processing itself broke (not a cell): report it, go on
                rec = dict(notebook=p.name, ok=False, failed=dict(cell=-1, error=f"{type(e).__name__}: {e}", source=""),
                           title=p.stem, description="", seconds=0, crashed=True)
            records[p.name] = rec
            status = "ok" if rec["ok"] else f"FAILED at cell {rec['failed']['cell']}: {rec['failed']['error'].splitlines()[-1][:200]}"
            took = "(cached)" if rec.get("cached") else f"{rec['seconds']:6.1f}s"
            print(f"  {p.name:42s} {took:>8s}  {status}", flush=True)

    # pages not rebuilt this time keep their last record (for titles in the sidebar)
    pages = []
    for p in notebooks:
        rec = records.get(p.name)
        if rec is None and (CACHE_DIR / f"{p.stem}.json").exists(): rec = json.loads((CACHE_DIR / f"{p.stem}.json").read_text())
        if rec is None: rec = dict(notebook=p.name, title=p.stem, description="", ok=False, failed=None, seconds=0, unbuilt=True)
        pages.append({**rec, "page": page_name(p, nbs_path)})

    out.mkdir(parents=True, exist_ok=True)
    if not only:
        for old in list(out.glob("*.html")) + list((out / "figures").glob("*")): old.unlink()
    (out / "site.css").write_text(SITE_CSS + HtmlFormatter().get_style_defs(".highlight"))
    if (nbs_path / "styles.css").exists(): shutil.copy(nbs_path / "styles.css", out / "styles.css")
    else: (out / "styles.css").write_text("")
    doc_url = f"{cfg.get('doc_host', '')}{cfg.get('doc_baseurl', '')}"
    manifest, rendered = [], 0
    for rec in pages:
        if rec.get("unbuilt") or rec.get("crashed") or not (CACHE_DIR / f"{Path(rec['notebook']).stem}.ipynb").exists():
            manifest.append(dict(page=rec["page"], notebook=rec["notebook"], title=rec["title"], ok=False, built=False,
                                 failed=rec.get("failed")))
            continue
        if only and rec["notebook"] not in records:
            old = [m for m in _old_manifest(out) if m["page"] == rec["page"]]
            if old and (out / rec["page"]).exists():
                manifest.append(old[0]); continue
        manifest.append({**render_page(out, rec, pages, cfg, doc_url), "built": True})
        rendered += 1
    (out / "pages.json").write_text(json.dumps(dict(site_title=cfg.get("title", cfg.lib_name), pages=manifest), indent=1))
    failed = [m for m in manifest if not m["ok"] and m["notebook"] in records]
    print(f"wrote {rendered} of {len(manifest)} pages to {out} in {time.time() - started:.0f}s"
          + (f"; FAILED: {', '.join(m['notebook'] for m in failed)}" if failed else ""), flush=True)
    for m in manifest:
        for f in m.get("math_failures", []): print(f"  warning: {m['page']}: LaTeX shown as source: {f}")
    return 1 if failed else 0


def _old_manifest(out: Path):
    try: return json.loads((out / "pages.json").read_text())["pages"]
    except (OSError, ValueError, KeyError): return []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "_site"), help="output folder (default: _site)")
    ap.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="build only these notebooks (names with or without .ipynb)")
    ap.add_argument("--force", action="store_true", help="execute every notebook again, ignoring the cache")
    ap.add_argument("--workers", type=int, help="notebooks executed at once (default: $CIRCUIT_NB_DOCS_WORKERS or 2)")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    return build(Path(args.out).resolve(), only=args.only, force=args.force, workers=args.workers)


if __name__ == "__main__": sys.exit(main())
