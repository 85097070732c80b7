"""Open every page of the built docs in headless Chromium and check what a reader would see.

    .venv/bin/python docs_tools/build_docs.py     # first: the pages, in _site/
    .venv/bin/python docs_tools/check_docs.py     # then: this check; exits 1 if any page fails

Options: `--site DIR` (default _site), `--shots DIR` (screenshots; default _site/_check), `--timeout S` (the whole
check, server and browser included, is stopped after S seconds; default 600), `--no-install`.

Needs Debian's `chromium` (installed with apt-get when missing and running as root; no chromedriver: the browser is
driven over the Chrome DevTools protocol on a pipe, `--remote-debugging-pipe`, with the standard library only).
The pages are served by Python's http.server on 127.0.0.1 (a free port), for the length of the check only.

For each page listed in _site/pages.json (written by build_docs.py) it asserts:
- it loads (HTTP 200), with no console error, no uncaught exception and no failed or 4xx/5xx request;
- it shows its title (the browser tab's title and the page's heading) and the description, if any;
- the sidebar links every page, marking this one;
- its API entries (one per `show_doc`): as many as the build rendered and at least as many as the notebook has
  visible `show_doc(...)` cells, each with an anchored heading and a signature, and the parameter tables;
- its figures: every image has loaded with a non-zero natural size and is laid out, as many as the build wrote;
- its widget snapshots and formulas (MathML) are there, as many as the build rendered;
- no error output, no build-failure notice, no nbdev directive (`#| ...`) in any code shown, and none of the code of
  the notebook's `#| hide` and `#| export` cells (nbdev shows exported code through `show_doc` only);
- every link to a page of the site resolves (no 404), and every `#anchor` it names exists on the target page.
It saves a screenshot of each page's first screen (NAME.png) and of the whole page at half scale (NAME-full.png).
"""
from __future__ import annotations

import argparse, base64, fcntl, functools, html, http.server, json, os, queue, re, shutil, socketserver, subprocess, sys
import tempfile, threading, time, urllib.error, urllib.parse, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--no-default-browser-check", "--mute-audio",
         "--hide-scrollbars", "--force-device-scale-factor=1", "--window-size=1280,900", "--remote-debugging-pipe"]
WIDTH, HEIGHT = 1280, 900


# ---------------------------------------------------------------------------------------------------------------
# Chromium


def find_chromium():
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name): return shutil.which(name)
    return None


def ensure_chromium(install: bool = True) -> str:
    "Debian's chromium, installed with apt-get if it is missing."
    found = find_chromium()
    if found: return found
    if not install: sys.exit("chromium is not installed (apt-get install -y chromium)")
    if os.geteuid() != 0: sys.exit("chromium is not installed; as root run: apt-get update && apt-get install -y chromium")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)  # a new machine's package lists may be missing or old
    policy = subprocess.run(["apt-cache", "policy", "chromium"], capture_output=True, text=True, env=env).stdout
    print(policy.strip(), flush=True)
    if "Candidate: (none)" in policy or "Candidate:" not in policy: sys.exit("apt has no chromium package to install")
    print("installing chromium with apt-get (a minute or two)", flush=True)
    subprocess.run(["apt-get", "install", "-y", "chromium"], check=True, env=env)
    found = find_chromium()
    if not found: sys.exit("apt-get installed chromium but no chromium binary is on PATH")
    return found


class Browser:
    "Headless Chromium driven over the DevTools protocol on a pipe (fd 3 in, fd 4 out): no driver, no websocket."

    def __init__(self, chromium: str, profile: str, log_path: Path):
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        # the child's ends go to fds >= 10 first, so that moving them to 3 and 4 in the child cannot clobber one another
        child_r, child_w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
        os.close(to_r); os.close(from_w)
        to_r, from_w = child_r, child_w
        # a two-line trampoline puts them at 3 and 4 and becomes chromium (dash cannot redirect fds above 9)
        trampoline = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
                      "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])")
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", trampoline, str(to_r), str(from_w), chromium, *FLAGS,
                                      f"--user-data-dir={profile}", "about:blank"],
                                     pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        os.close(to_r); os.close(from_w)
        self.out, self.inp = to_w, os.fdopen(from_r, "rb", buffering=0)
        self.next_id, self.lock = 0, threading.Lock()
        self.replies, self.events = {}, queue.Queue()
        self.reply_ready = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        while True:
            chunk = self.inp.read(1 << 16)
            if not chunk: break
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            for raw in msgs:
                msg = json.loads(raw)
                if "id" in msg:
                    with self.reply_ready: self.replies[msg["id"]] = msg; self.reply_ready.notify_all()
                else: self.events.put(msg)
        with self.reply_ready: self.replies[-1] = {"closed": True}; self.reply_ready.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        with self.lock: self.next_id += 1; mid = self.next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session: msg["sessionId"] = session
        os.write(self.out, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        with self.reply_ready:
            while mid not in self.replies:
                if -1 in self.replies: raise RuntimeError(f"chromium exited (see {self.log.name})")
                left = deadline - time.time()
                if left <= 0: raise TimeoutError(f"no reply to {method} in {timeout}s")
                self.reply_ready.wait(left)
            reply = self.replies.pop(mid)
        if "error" in reply: raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def close(self):
        try: self.send("Browser.close", timeout=10)
        except Exception: pass
        try: self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        try: os.close(self.out)
        except OSError: pass
        self.log.close()


# ---------------------------------------------------------------------------------------------------------------
# The local server


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list = []
    def log_message(self, fmt, *args): pass
    def log_request(self, code="-", size="-"):
        QuietHandler.requests.append((self.path, int(code) if str(code).isdigit() else code))


def serve(site: Path):
    "Serve `site` on 127.0.0.1, on a free port, from a daemon thread; return the server (shutdown() stops it)."
    handler = functools.partial(QuietHandler, directory=str(site))
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.2), daemon=True).start()
    return server


# ---------------------------------------------------------------------------------------------------------------
# What a page shows

FACTS_JS = r"""
(async () => {
  await Promise.all([...document.images].map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; })));
  const main = document.querySelector('main') || document.body;
  const text = e => (e ? e.textContent.trim() : null);
  return {
    title: document.title,
    h1: text(main.querySelector('h1.title')),
    description: text(main.querySelector('#title-block .description')),
    sidebar: [...document.querySelectorAll('#sidebar a')].map(a => ({href: a.getAttribute('href'), active: a.classList.contains('active')})),
    api: [...main.querySelectorAll('section.api-entry')].map(e => {
      const h = e.querySelector('h1[id],h2[id],h3[id],h4[id]');
      return {name: e.dataset.api, id: h ? h.id : null, heading: text(h), signature: !!e.querySelector('pre code'),
              table: !!e.querySelector('table'), rows: e.querySelectorAll('table tbody tr').length};
    }),
    images: [...main.querySelectorAll('img')].map(i => {
      const r = i.getBoundingClientRect();
      return {src: i.getAttribute('src').slice(0, 60), complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
              shownW: r.width, shownH: r.height};
    }),
    widgets: main.querySelectorAll('.widget-snapshot').length,
    math: main.querySelectorAll('math').length,
    errors: main.querySelectorAll('.cell-output-error').length,
    buildError: !!main.querySelector('.build-error'),
    directives: [...main.querySelectorAll('pre')].map(p => p.textContent).filter(t => /^\s*#\|/m.test(t)).map(t => t.slice(0, 120)),
    code: [...main.querySelectorAll('pre.sourceCode')].map(p => p.textContent.trim()),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
    height: document.documentElement.scrollHeight,
  };
})()
"""


def hidden_sources(nb_file: Path) -> list:
    "The code of `#| hide` and `#| export` cells (directives taken out): nbdev leaves it off the page."
    out = []
    for cell in json.loads(nb_file.read_text())["cells"]:
        if cell["cell_type"] != "code": continue
        lines = "".join(cell["source"]).splitlines()
        if not any(re.match(r"^\s*#\|\s*(hide|export|exporti)\s*(\w+)?\s*$", l) for l in lines): continue
        code = "\n".join(l for l in lines if not re.match(r"^\s*#\|", l)).strip()
        if len(code) >= 20: out.append(code)
    return out


def visible_show_doc_cells(nb_file: Path) -> int:
    "Code cells of the notebook that call show_doc and are not hidden: each must give an API entry."
    nb = json.loads(nb_file.read_text())
    n = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code": continue
        src = "".join(cell["source"])
        directives = [l for l in src.splitlines() if re.match(r"^\s*#\|", l)]
        if any(re.match(r"^\s*#\|\s*(hide|export|exporti|eval:\s*false|include:\s*false)\b", d) for d in directives): continue
        n += len(re.findall(r"^show_doc\(", src, flags=re.M))
    return n


class PageCheck:
    def __init__(self, page: dict): self.page, self.failures, self.notes = page, [], []
    def check(self, ok: bool, what: str):
        if not ok: self.failures.append(what)
    @property
    def ok(self): return not self.failures


def drain(browser: Browser, session: str, sink: list, until: str | None = None, timeout: float = 30, quiet: float = 0.3):
    "Collect this session's events into `sink` until the `until` event (then `quiet` s with no event), or timeout."
    deadline, seen_until, last = time.time() + timeout, until is None, time.time()
    while time.time() < deadline:
        try: msg = browser.events.get(timeout=0.05)
        except queue.Empty:
            if seen_until and time.time() - last >= quiet: return True
            continue
        if msg.get("sessionId") != session: continue
        sink.append(msg); last = time.time()
        if msg["method"] == until: seen_until = True
    return seen_until


def problems(events: list, base: str) -> list:
    "Console errors, exceptions and failed requests among a page load's events."
    out = []
    for e in events:
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("uncaught exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"browser log error: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
        elif m == "Network.responseReceived" and p.get("response", {}).get("status", 200) >= 400:
            out.append(f"HTTP {p['response']['status']} for {p['response']['url'].replace(base, '')}")
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            out.append(f"request failed ({p.get('errorText')}): {p.get('requestId')}")
    return out


def check_site(site: Path, shots: Path, chromium: str, deadline: float) -> int:
    manifest = json.loads((site / "pages.json").read_text())
    pages = manifest["pages"]
    nbs = ROOT / "nbs"
    shots.mkdir(parents=True, exist_ok=True)
    for old in shots.glob("*.png"): old.unlink()
    server = serve(site)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    profile = tempfile.mkdtemp(prefix="circuit_nb-docs-chromium-")
    browser = Browser(chromium, profile, shots / "chromium.log")
    timer = threading.Timer(max(1.0, deadline - time.time()), lambda: (print("check timed out: stopping chromium", flush=True),
                                                                        browser.proc.kill()))
    timer.daemon = True; timer.start()
    results, facts = [], {}
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"): browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1,
                                                            "mobile": False}, session=session)
        all_pages = {p["page"] for p in pages}
        for page in pages:
            pc = PageCheck(page)
            results.append(pc)
            if not page.get("built", True):
                pc.check(False, f"not built: {page.get('failed')}")
                continue
            started = time.time()
            events = []
            drain(browser, session, [], timeout=0.2, quiet=0.05)  # leftovers of the last page
            nav = browser.send("Page.navigate", {"url": base + page["page"]}, session=session)
            pc.check(not nav.get("errorText"), f"navigation failed: {nav.get('errorText')}")
            loaded = drain(browser, session, events, until="Page.loadEventFired", timeout=60)
            pc.check(loaded, "no load event within 60 s")
            doc = [e for e in events if e["method"] == "Network.responseReceived" and e["params"].get("type") == "Document"]
            pc.check(bool(doc) and doc[0]["params"]["response"]["status"] == 200,
                     f"page status {doc[0]['params']['response']['status'] if doc else 'unknown'}")
            res = browser.send("Runtime.evaluate", {"expression": FACTS_JS, "awaitPromise": True, "returnByValue": True},
                               session=session)
            if "exceptionDetails" in res:
                pc.check(False, f"could not read the page: {res['exceptionDetails'].get('text')}")
                continue
            f = res["result"]["value"]
            facts[page["page"]] = f
            drain(browser, session, events, timeout=1, quiet=0.2)
            for problem in problems(events, base): pc.check(False, problem)

            # title, description, sidebar
            pc.check(bool(page["title"]) and f["h1"] == page["title"], f"heading {f['h1']!r}, expected {page['title']!r}")
            pc.check(f["title"].startswith(page["title"]), f"browser title {f['title']!r} does not start with {page['title']!r}")
            if page.get("description"): pc.check(f["description"] == page["description"], "description missing or different")
            hrefs = {a["href"] for a in f["sidebar"]}
            pc.check(hrefs == all_pages, f"sidebar lists {sorted(hrefs)}, expected every page {sorted(all_pages)}")
            pc.check([a["href"] for a in f["sidebar"] if a["active"]] == [page["page"]], "sidebar does not mark this page")

            # API entries
            api = f["api"]
            expected_calls = visible_show_doc_cells(nbs / page["notebook"]) if (nbs / page["notebook"]).exists() else 0
            pc.check(len(api) == page["api_entries"], f"{len(api)} API entries shown, the build rendered {page['api_entries']}")
            pc.check(len(api) >= expected_calls, f"{len(api)} API entries shown, the notebook has {expected_calls} show_doc cells")
            bad = [a["name"] for a in api if not (a["id"] and a["heading"] and a["signature"])]
            pc.check(not bad, f"API entries without anchored heading or signature: {bad}")
            tables = sum(a["table"] and a["rows"] > 0 for a in api)
            pc.check(tables == page["api_tables"], f"{tables} API tables with rows shown, the build rendered {page['api_tables']}")

            # figures, widgets, math
            imgs = f["images"]
            broken = [i["src"] for i in imgs if not (i["complete"] and i["w"] > 0 and i["h"] > 0 and i["shownW"] > 0 and i["shownH"] > 0)]
            pc.check(not broken, f"images not loaded or not shown: {broken}")
            pc.check(len(imgs) == page["images"], f"{len(imgs)} images on the page, the build wrote {page['images']}")
            pc.check(f["widgets"] == page["widgets"], f"{f['widgets']} widget snapshots, the build rendered {page['widgets']}")
            pc.check(f["math"] == page["math"] - len(page.get("math_failures", [])),
                     f"{f['math']} formulas as MathML, the build rendered {page['math'] - len(page.get('math_failures', []))}")

            # clean output
            pc.check(page["ok"] and not f["buildError"], f"the notebook failed during the build: {page.get('failed')}")
            pc.check(f["errors"] == 0, f"{f['errors']} error outputs on the page")
            pc.check(not f["directives"], f"nbdev directives shown in code: {f['directives'][:3]}")
            if (nbs / page["notebook"]).exists():
                shown = "\n".join(f["code"])
                leaked = [h.splitlines()[0][:80] for h in hidden_sources(nbs / page["notebook"]) if h in shown]
                pc.check(not leaked, f"code of #| hide / #| export cells shown: {leaked[:3]}")

            # screenshots
            shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
            (shots / f"{Path(page['page']).stem}.png").write_bytes(base64.b64decode(shot["data"]))
            full_h = min(int(f["height"]), 16000)
            shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                "clip": {"x": 0, "y": 0, "width": WIDTH, "height": full_h, "scale": 0.5}}, session=session, timeout=120)
            (shots / f"{Path(page['page']).stem}-full.png").write_bytes(base64.b64decode(shot["data"]))
            pc.notes.append(f"{time.time() - started:.1f}s")
            if time.time() > deadline: raise TimeoutError("check ran past --timeout")

        # links between pages, and their anchors
        status = {}
        def fetch(url):
            if url not in status:
                try:
                    with urllib.request.urlopen(url, timeout=10) as r: status[url] = (r.status, r.read().decode("utf-8", "replace"))
                except urllib.error.HTTPError as e: status[url] = (e.code, "")
            return status[url]
        for pc in results:
            f = facts.get(pc.page["page"])
            if not f: continue
            n_internal = 0
            for link in f["links"]:
                if not link.startswith(base): continue
                n_internal += 1
                url, _, frag = link.partition("#")
                code, body = fetch(url)
                rel = link[len(base):]
                if code != 200: pc.check(False, f"link {rel} -> HTTP {code}"); continue
                if frag:
                    target_page = url[len(base):] or "index.html"
                    ids = set(facts[target_page]["ids"]) if target_page in facts else set(re.findall(r'\sid="([^"]+)"', body))
                    pc.check(urllib.parse.unquote(frag) in ids, f"link {rel}: no #{frag} on {target_page}")
            pc.notes.append(f"{n_internal} internal links")
        stray = [(p, c) for p, c in QuietHandler.requests if isinstance(c, int) and c >= 400]
        if stray: print(f"server answered errors: {stray[:10]}")
    finally:
        timer.cancel()
        browser.close()
        server.shutdown(); server.server_close()
        shutil.rmtree(profile, ignore_errors=True)

    passed = sum(pc.ok for pc in results)
    width = max(len(pc.page["page"]) for pc in results)
    for pc in results:
        p, f = pc.page, facts.get(pc.page["page"], {})
        counts = (f"api {len(f.get('api', []))} (tables {sum(a['table'] for a in f.get('api', []))}), "
                  f"images {len(f.get('images', []))}, widgets {f.get('widgets', 0)}, math {f.get('math', 0)}")
        print(f"{'PASS' if pc.ok else 'FAIL'}  {p['page']:{width}s}  {counts}; {', '.join(pc.notes)}")
        for what in pc.failures: print(f"      - {what}")
    (shots / "report.json").write_text(json.dumps([dict(page=pc.page["page"], ok=pc.ok, failures=pc.failures,
                                                        facts={k: v for k, v in facts.get(pc.page["page"], {}).items()
                                                               if k not in ("ids", "links", "code")})
                                                   for pc in results], indent=1))
    print(f"screenshots and report.json in {shots}")
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) and results else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", default=str(ROOT / "_site"))
    ap.add_argument("--shots", default=None, help="where screenshots go (default: SITE/_check)")
    ap.add_argument("--timeout", type=float, default=600, help="stop the whole check after this many seconds")
    ap.add_argument("--no-install", action="store_true", help="fail instead of installing chromium with apt-get")
    args = ap.parse_args(argv)
    started = time.time()
    site = Path(args.site).resolve()
    if not (site / "pages.json").exists(): sys.exit(f"{site}/pages.json not found: run docs_tools/build_docs.py first")
    chromium = ensure_chromium(install=not args.no_install)
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"checking {site} with {version}", flush=True)
    rc = check_site(site, Path(args.shots) if args.shots else site / "_check", chromium, started + args.timeout)
    print(f"docs check took {time.time() - started:.0f}s")
    return rc


if __name__ == "__main__": sys.exit(main())
