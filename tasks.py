#!/usr/bin/env python3
"""Set up circuit_nb and run it: the README's two commands.

    python3 tasks.py run    # make the environment (once), then the main job on the shipped default
    python3 tasks.py test   # make the environment (once), then run every notebook as a test
    python3 tasks.py docs   # make the environment (once), build the rendered docs into _site/ and check every page in headless Chromium
    python3 tasks.py test-tl4   # the same tests in a second environment with TransformerLens 4 (constraints-tl4.txt, .venv-tl4)

Maintainers also have `python3 tasks.py readme` (README.md from nbs/index.ipynb, what nbdev_readme
does where Quarto is installed) and `python3 tasks.py setup` (the environment alone).

Needs only python3 (with its standard `venv` module). The environment lives in `.venv` (or in
$CIRCUIT_NB_VENV) and is rebuilt only when `constraints.txt`, `setup.py` or `settings.ini` change.
"""
import hashlib, os, subprocess, sys, venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("CIRCUIT_NB_VENV", ROOT / ".venv"))
CONSTRAINTS = "constraints.txt"  # the tested install set: TransformerLens 3.9
if len(sys.argv) > 1 and sys.argv[1] == "test-tl4":  # the second tested set: TransformerLens 4 and transformers 5
    VENV, CONSTRAINTS = Path(os.environ.get("CIRCUIT_NB_VENV_TL4", ROOT / ".venv-tl4")), "constraints-tl4.txt"
PY = VENV / "bin" / "python"
STAMP = VENV / ".circuit_nb-installed"
INSTALL_INPUTS = [CONSTRAINTS, "setup.py", "settings.ini"]


def _install_fingerprint():
    digest = hashlib.sha256()
    for name in INSTALL_INPUTS: digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_env():
    "Create the virtual environment and install the package with its pinned dependencies, if needed."
    fingerprint = _install_fingerprint()
    if STAMP.exists() and STAMP.read_text() == fingerprint and PY.exists(): return
    if not PY.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        try: venv.create(VENV, with_pip=True)
        except Exception as e:
            sys.exit(f"could not create a virtual environment ({e}); on Debian/Ubuntu install python3-venv")
    print("installing circuit_nb and its pinned dependencies (first run: a few minutes)", flush=True)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["-c", str(ROOT / CONSTRAINTS), "-e", f"{ROOT}[dev]"], check=True, cwd=ROOT)
    STAMP.write_text(fingerprint)


def _in_venv(*args):
    "Run this file's `args` command with the environment's python, single-threaded BLAS per worker."
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), MPLBACKEND="Agg")
    return subprocess.run([str(PY), __file__, *args], cwd=ROOT, env=env).returncode


def _test_notebooks(flags=""):
    "Run every notebook in nbs/ with nbdev's test runner; print a line per notebook and a closing count."
    from fastcore.parallel import parallel
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    from nbdev.test import test_nb
    cfg = get_config()
    files = sorted(nbglob(cfg.nbs_path, skip_file_re="^[_.]", as_path=True))
    skipped = [] if _has_hooked_transformer() else [f for f in files if _needs_hooked_transformer(f)]
    for f in skipped: print(f"SKIP  {f.relative_to(cfg.config_path)}  (builds TransformerLens 3 HookedTransformers; this TransformerLens has none)", flush=True)
    files = [f for f in files if f not in skipped]
    skip_flags = cfg.tst_flags.split()
    run_flags = flags.split()
    for f in run_flags:
        if f in skip_flags: skip_flags.remove(f)
    n_workers = int(os.environ.get("CIRCUIT_NB_TEST_WORKERS", min(2, os.cpu_count() or 1)))
    results = parallel(test_nb, files, skip_flags=skip_flags, force_flags=run_flags, n_workers=n_workers,
                       basepath=cfg.config_path, pause=0.5, do_print=False)
    passed = failed = 0
    for f, (ok, secs) in zip(files, results):
        print(f"{'PASS' if ok else 'FAIL'}  {f.relative_to(cfg.config_path)}  ({secs:.1f}s)", flush=True)
        passed, failed = passed + ok, failed + (not ok)
    print(f"{passed} passed, {failed} failed" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return 0 if failed == 0 and passed > 0 else 1


TL3_MARK = "# needs TransformerLens 3"  # in a notebook's code: it builds HookedTransformer models


def _has_hooked_transformer() -> bool:
    "Whether the installed TransformerLens has HookedTransformer (3.x; 4.0 removed it)."
    from importlib.metadata import version
    return int(version("transformer-lens").split(".")[0]) < 4


def _needs_hooked_transformer(path) -> bool:
    "Whether a notebook says that it needs TransformerLens 3 (it builds HookedTransformer models, which 4.0 removed)."
    import json
    cells = json.loads(Path(path).read_text())["cells"]
    return any(TL3_MARK in "".join(c["source"]) for c in cells if c["cell_type"] == "code")


def _docs(*build_args):
    "Build the rendered docs into _site/ (docs_tools/build_docs.py), then check every page in headless Chromium."
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    tools = ROOT / "docs_tools"
    built = subprocess.run([str(PY), str(tools / "build_docs.py"), *build_args], cwd=ROOT, env=env).returncode
    checked = subprocess.run([str(PY), str(tools / "check_docs.py")], cwd=ROOT, env=env).returncode
    return built or checked


def readme_text(index=ROOT / "nbs" / "index.ipynb") -> str:
    "README.md's text, from the landing-page notebook: markdown as is, code in fences, hidden cells left out."
    import json
    parts = []
    for cell in json.loads(index.read_text())["cells"]:
        src = "".join(cell["source"]).strip()
        if cell["cell_type"] == "markdown": parts.append(src)
        elif not src.startswith("#| hide"):
            code = "\n".join(l for l in src.splitlines() if not l.startswith("#|"))
            parts.append(f"```python\n{code}\n```")
    return "\n\n".join(parts) + "\n"


def main(argv):
    cmd = argv[1] if len(argv) > 1 else "run"
    if cmd == "_test": return _test_notebooks(" ".join(argv[2:]))
    if cmd == "readme":
        (ROOT / "README.md").write_text(readme_text())
        return 0
    if cmd not in ("run", "test", "test-tl4", "setup", "docs"): sys.exit(f"unknown command {cmd!r}: use 'run' or 'test'")
    ensure_env()
    if cmd == "setup": return 0
    if cmd == "docs": return _docs(*argv[2:])
    if cmd == "run":
        env = dict(os.environ, MPLBACKEND=os.environ.get("MPLBACKEND", "Agg"))
        return subprocess.run([str(VENV / "bin" / "circuit_nb"), *argv[2:]], cwd=ROOT, env=env).returncode
    return _in_venv("_test", *argv[2:])


if __name__ == "__main__": sys.exit(main(sys.argv))
