"""Build the documentation site: every notebook in `nbs/` executed and rendered, the README as the home page.

    python docs/site/build.py            # all notebooks, into nbdev's doc_path (_docs/)
    python docs/site/build.py --timing   # and every notebook's seconds
    python docs/site/build.py --workers 1 nbs/30_evaluation/31_discrimination.ipynb   # a partial site, for the edit loop

`make docs` runs it and `make test` runs `make docs`, so a notebook whose examples stop running fails CI.
The pages are what `nbdev-docs` would make, rendered without Quarto (the `quarto-cli` package on PyPI
downloads its binary from GitHub when it installs, which offline machines cannot do):
- nbdev's own doc processors prepare each notebook: `#| hide` cells dropped, a signature-and-docstring
  block for each exported function or class (its source folded under it), backticked names linked;
- every cell runs, as `nbdev-test` runs it (in-process, from the notebook's own folder, `tst_flags` cells
  skipped), so the pages show the examples' outputs, while the committed notebooks stay clean;
- nbconvert writes the HTML with the template beside this file: a sidebar in reading order, images
  embedded, formulas as MathML, and no script or stylesheet loaded from the network (checked).
"""
from __future__ import annotations

import argparse, json, multiprocessing, os, re, shutil, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


# ---------------------------------------------------------------- the pages and the navigation
def _title(nb_path: Path) -> str:
    "The notebook's H1 (nbdev's title), or its file name."
    cells = json.loads(nb_path.read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if cell["cell_type"] == "markdown":
            m = re.search(r"^#\s+(.+?)\s*$", "".join(cell["source"]), re.M)
            if m: return m.group(1)
    return nb_path.stem

def _section(folder: str) -> str:
    name = re.sub(r"^\d+_", "", folder)
    return name.upper() if len(name) <= 3 else name.capitalize()

def _short(title: str, section: str) -> str:
    "The sidebar's name for a page: the title up to its colon (after it when that part just repeats the section)."
    head, _, tail = title.replace("`", "").partition(":")
    if tail and head.strip().lower() == section.lower(): return tail.strip()[:1].upper() + tail.strip()[1:]
    return head.strip()

def site_pages(cfg, only: list[Path] | None = None) -> list[dict]:
    "The notebooks nbdev-test runs (folders holding a `.notest` file left out), in reading order."
    from nbdev.config import nbpath2html
    from nbdev.doclinks import nbglob
    nbs = Path(cfg.nbs_path)
    files = [Path(f) for f in nbglob(nbs, as_path=True)]
    files = sorted(f for f in files if not (f.parent/".notest").exists())
    if only: files = [f for f in files if f.resolve() in {o.resolve() for o in only}]
    pages = []
    for f in files:
        rel = f.relative_to(nbs)
        title = _title(f)
        section = _section(rel.parts[0]) if len(rel.parts) > 1 else ""
        pages.append(dict(src=str(f), href=nbpath2html(rel).as_posix(), title=title.replace("`", ""),
                          short=_short(title, section), section=section))
    return pages

def navigation(pages: list[dict], current: str) -> dict:
    "What the page template needs: sections for the sidebar, previous and next page, the way back to the root."
    sections: list[dict] = []
    for p in pages:
        if not sections or sections[-1]["name"] != p["section"]: sections.append(dict(name=p["section"], pages=[]))
        sections[-1]["pages"].append(dict(href=p["href"], title=p["short"]))
    order = [dict(href="index.html", title="Home")] + [dict(href=p["href"], title=p["short"]) for p in pages]
    i = next((k for k, o in enumerate(order) if o["href"] == current), 0)
    return dict(sections=sections, current=current, root="../" * current.count("/"),
                prev=order[i-1] if i > 0 else None, next=order[i+1] if i+1 < len(order) else None,
                css=(HERE/"site.css").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- one notebook: run, process, render
def _skipped(cell, flags: set) -> bool:
    "Cells nbdev-test leaves out: markdown, `#| eval: false`, and cells carrying one of `tst_flags`."
    d = cell.directives_ or {}
    return cell.cell_type != "code" or str(d.get("eval", "")).lower() == "false" or bool(flags & d.keys())

class NotebookFailed(Exception): "A cell of the notebook raised: the message names the cell and shows its traceback."

def _failure(nb, e: BaseException) -> str:
    "The failing cell's source and the end of its traceback, as nbdev-test would show them."
    bad = next((c for c in nb.cells if any(o.get("output_type") == "error" for o in c.get("outputs", []))), None)
    if bad is None: return f"{type(e).__name__}: {e}"
    err = next(o for o in bad.outputs if o.get("output_type") == "error")
    tb = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(err.get("traceback", []))).strip().splitlines()
    src = bad.source if isinstance(bad.source, str) else "".join(bad.source)
    return "\n".join([f"cell {bad.idx_} failed:", *("    " + l for l in src.splitlines()[:12]), *tb[-12:]])

def execute(path: Path, cfg):
    "Run every cell of the notebook at `path` from its own folder; the shell is returned for the show_doc cells."
    from execnb.shell import CaptureShell
    from fastcore.nbio import dict2nb, nb2str
    from fastcore.xtras import working_directory
    from nbdev.process import NBProcessor
    nb = NBProcessor(path, rm_directives=False, process=True).nb
    nb.path_ = str(path)
    flags = set(cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else cfg.tst_flags)
    shell = CaptureShell(path, profile=bool(cfg.exec_profile))
    os.environ["IN_TEST"] = "1"  # as under nbdev-test
    try:
        with working_directory(path.parent):
            shell.run_all(nb, exc_stop=True, preproc=lambda c: _skipped(c, flags), cell_timeout=cfg.cell_timeout or None)
    except BaseException as e:
        shell.close()
        raise NotebookFailed(_failure(nb, e)) from None
    finally: os.environ.pop("IN_TEST", None)
    ran = dict2nb(json.loads(nb2str(nb)))  # outputs' text as strings, as nbdev's processors read it from a file
    ran.path_ = str(path)
    return ran, shell

_EXPORT = re.compile(r"^(\s*#\|\s*)export(\s*)$", re.M)
_DEFS = re.compile(r"^(?:async\s+def|def|class)\s", re.M)

def _show_exported_source(nb):
    "Exported definitions keep their source (folded under the signature), as nbdev does for `#| exports`."
    for cell in nb.cells:
        if cell.cell_type == "code" and "export" in cell.directives and _DEFS.search(cell.source):
            cell.source = _EXPORT.sub(r"\1exports\2", cell.source, count=1)

def doc_processors(shell):
    "nbdev's doc processors, with its `exec_show_docs` replaced: cells already ran; only the added show_doc cells run here."
    from nbdev.frontmatter import FrontmatterProc
    from nbdev.process import Processor
    from nbdev.processors import FilterDefaults, exec_show_docs, insert_warning

    class run_show_docs(Processor):
        "Run the `show_doc` cells that `add_show_docs` inserted, in the shell that ran the notebook."
        def begin(self): shell.run_cell("from nbdev.showdoc import show_doc")
        def cell(self, cell):
            if not getattr(cell, "has_sd", False): return
            shell.cell(cell)
            if shell.exc: raise RuntimeError(f"{cell.source.splitlines()[-1]}: {type(shell.exc).__name__}: {shell.exc}")

    # The first markdown cell (title, summary, opening paragraph) stays as written: nbdev would turn it
    # into Quarto front matter and drop the paragraph. The "autogenerated" warning is for Markdown output.
    skip = (FrontmatterProc, insert_warning)
    return [run_show_docs if p is exec_show_docs else p for p in FilterDefaults().base_procs() if p not in skip]

_OPTION = re.compile(r"^#\|\s*([\w-]+)\s*:\s*(.*?)\s*$")
_QUARTO_ATTRS = re.compile(r"(\]\([^)\s]+\))\{[^}\n]*\}")  # [text](url){target="_blank" ...}

def _apply_cell_options(nb) -> dict:
    "The Quarto cell options nbdev leaves in the source, done as nbconvert understands them; formulas set aside."
    cells, formulas = [], {}
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.pop("has_sd", None)  # nbdev's marker, not a notebook field
            cell.metadata.pop("execution", None)  # execnb's timings (not valid nbformat metadata)
            lines = cell.source.splitlines()
            opts = {}
            while lines and (m := _OPTION.match(lines[0])):
                opts[m[1]] = m[2].strip('"')
                lines.pop(0)
            cell.source = "\n".join(lines)
            if opts.get("include") == "false": continue
            if opts.get("output") == "false": cell.outputs = []
            if opts.get("echo") == "false": cell.metadata.setdefault("transient", {})["remove_source"] = True
            if "code-fold" in opts: cell.metadata["code_fold"] = opts.get("code-summary", "Source")
            for out in cell.get("outputs", []):
                md = out.get("data", {}).get("text/markdown")
                if md: out["data"]["text/markdown"] = _QUARTO_ATTRS.sub(r"\1", "".join(md) if isinstance(md, list) else md)
        elif cell.cell_type == "markdown":
            cell.source = set_formulas_aside(cell.source, formulas)
        cells.append(cell)
    nb.cells = cells
    return formulas

_CODE = re.compile(r"(```.*?```|`[^`\n]*`)", re.S)
_MATH = re.compile(r"\$\$(.+?)\$\$|\$(?=\S)([^$\n]+?)(?<=\S)\$(?!\d)", re.S)

def set_formulas_aside(md: str, formulas: dict) -> str:
    "TeX between dollars replaced by a placeholder, its MathML (drawn by browsers without MathJax) kept in `formulas`."
    from latex2mathml.converter import convert
    def tex(m):
        key = f"healthmlformula{len(formulas)}x"  # a word Markdown leaves alone; the MathML goes in after rendering
        formulas[key] = convert(m[1].strip(), display="block") if m[1] is not None else convert(m[2])
        return key
    parts = _CODE.split(md)
    return "".join(_MATH.sub(tex, p) if i % 2 == 0 else p for i, p in enumerate(parts))

def to_html(nb, title: str, site: dict, base: Path, formulas: dict | None = None) -> str:
    "The page: nbconvert's lab export through the site template, images embedded, root-relative links made relative."
    import nbformat
    from fastcore.nbio import nb2str
    from nbconvert import HTMLExporter
    node = nbformat.reads(nb2str(nb), as_version=4)
    node.metadata["title"] = f"{title} – healthml"
    for i, cell in enumerate(node.cells): cell.setdefault("id", f"cell-{i}")
    exporter = HTMLExporter(template_name="page", extra_template_basedirs=[str(HERE)], embed_images=True,
                            exclude_input_prompt=True, exclude_output_prompt=True)
    page, _ = exporter.from_notebook_node(node, resources=dict(site=site, metadata=dict(name=title, path=str(base))))
    for key, math in (formulas or {}).items(): page = page.replace(key, math)
    return re.sub(r'(href|src)="/(?!/)', lambda m: f'{m[1]}="{site["root"]}', page)

def render_notebook(job) -> dict:
    "Run, process and render one notebook; the error, not a traceback, if a cell fails."
    page, site, out = job
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    start = time.time()
    src = Path(page["src"])
    main = sys.modules["__main__"]  # IPython swaps in its own: put ours back so the next job unpickles
    try:
        cfg = get_config(src.parent)
        if str(cfg.config_path) not in sys.path: sys.path.insert(0, str(cfg.config_path))  # as nbdev-test's basepath
        nb, shell = execute(src, cfg)
        _show_exported_source(nb)
        NBProcessor(nb=nb, procs=doc_processors(shell), rm_directives="quarto").process()
        formulas = _apply_cell_options(nb)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(to_html(nb, page["title"], site, src.parent, formulas), encoding="utf-8")
        shell.close()
        return dict(src=str(src), seconds=time.time() - start, error=None)
    except NotebookFailed as e: return dict(src=str(src), seconds=time.time() - start, error=str(e))
    except Exception as e:
        return dict(src=str(src), seconds=time.time() - start, error=f"{type(e).__name__}: {e}")
    finally: sys.modules["__main__"] = main


# ---------------------------------------------------------------- the home page and the whole site
def render_home(cfg, site: dict, out: Path):
    "README.md as the home page: one maintained file, its images embedded, backticked healthml names linked."
    from fastcore.nbio import mk_cell, new_nb
    from nbdev.doclinks import NbdevLookup
    readme = (ROOT/"README.md").read_text(encoding="utf-8")
    nb = new_nb([mk_cell(NbdevLookup().linkify(readme), "markdown")])
    out.write_text(to_html(nb, cfg.title, site, ROOT), encoding="utf-8")

def remote_loads(page: str) -> list[str]:
    "Every URL a page would load by itself (scripts, stylesheets, images, frames, CSS imports); links to click are fine."
    found = re.findall(r"<(?:script|img|iframe|source|audio|video|embed)\b[^>]*\bsrc=[\"']((?:https?:)?//[^\"']+)", page, re.I)
    found += re.findall(r"<link\b[^>]*\bhref=[\"']((?:https?:)?//[^\"']+)", page, re.I)
    found += re.findall(r"(?:@import\s+|url\()\s*[\"']?((?:https?:)?//[^\"')\s]+)", page, re.I)
    return found

TIMINGS = ".timings.json"  # seconds per notebook in the last build: the slowest start first next time

def render_all(jobs: list, workers: int) -> list[dict]:
    "Render the notebooks, `workers` at a time, each worker process reusing its imports across notebooks."
    if workers <= 1 or len(jobs) <= 1: return [render_notebook(j) for j in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(render_notebook, jobs))

def build(only: list[Path] | None = None, workers: int = 2, timing: bool = False) -> int:
    "Render the site into a scratch folder; replace doc_path with it only if every page rendered and loads nothing remote."
    from nbdev.config import get_config
    cfg = get_config(ROOT)
    dest, tmp = Path(cfg.doc_path), Path(f"{cfg.doc_path}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.time()
    pages = site_pages(cfg, only)
    last = json.loads((dest/TIMINGS).read_text()) if (dest/TIMINGS).exists() else {}
    def rel(p): return Path(p["src"]).relative_to(ROOT).as_posix()
    def note(p): return f"Rendered from {rel(p)}: edit the notebook, not this page."
    jobs = [(p, navigation(pages, p["href"]) | dict(title=cfg.title, source_note=note(p)), str(tmp/p["href"])) for p in pages]
    # Slowest first (the last build's timings), else later layers first: they compose more and tend to run longer.
    jobs = [j for i, j in sorted(enumerate(jobs), key=lambda ij: (-last.get(rel(ij[1][0]), 0), -ij[0]))]
    results = render_all(jobs, workers)
    render_home(cfg, navigation(pages, "index.html") | dict(title=cfg.title, source_note="Rendered from README.md."),
                tmp/"index.html")
    seconds = {rel(r): round(r["seconds"], 1) for r in results}
    (tmp/TIMINGS).write_text(json.dumps(dict(sorted(seconds.items())), indent=1))
    if timing:
        for nb, t in sorted(seconds.items(), key=lambda o: -o[1]): print(f"{t:6.1f}s  {nb}")
    failed = [r for r in results if r["error"]]
    for r in failed: print(f"✗ {Path(r['src']).relative_to(ROOT)}: {r['error']}", file=sys.stderr)
    remote = {str(f.relative_to(tmp)): urls for f in tmp.rglob("*.html")
              if (urls := remote_loads(f.read_text(encoding="utf-8")))}
    for f, urls in remote.items():
        print(f"✗ {f} would load from the network: {', '.join(sorted(set(urls))[:3])}", file=sys.stderr)
    if failed or remote:
        print(f"docs: {len(failed)} notebook(s) failed, {len(remote)} page(s) would load from the network; "
              f"{dest.name}/ left as it was, the partial site is in {tmp.name}/", file=sys.stderr)
        return 1
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    slowest = ", ".join(f"{Path(nb).stem} {t:.0f}s" for nb, t in sorted(seconds.items(), key=lambda o: -o[1])[:3])
    print(f"docs: {len(pages)} notebooks + home page in {time.time() - start:.0f}s (slowest: {slowest}) -> {dest.name}/index.html")
    return 0

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="only these notebooks (default: all)")
    ap.add_argument("--workers", type=int, default=2, help="notebooks rendered at once (default 2)")
    ap.add_argument("--timing", action="store_true", help="print every notebook's seconds")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    return build(args.notebooks or None, args.workers, args.timing)

if __name__ == "__main__":
    sys.exit(main())
