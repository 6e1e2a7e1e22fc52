"""`sigma-moe report RUN_DIR`: one self-contained HTML page, RUN_DIR/report.html, that opens
from disk (no server, no scripts from the network) and links the run's PNGs under
RUN_DIR/plots/, with the run's summary and resolved config. Plots of what the run did not
record are listed as such, never drawn empty."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from sigma_moe.fs import write_atomic
from sigma_moe.train.plots import PLOTS, WIDE, plot_run

PAGE = "report.html"

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em} td{padding:2px 12px 2px 0;vertical-align:top}
td:first-child{color:#555} figure{margin:1em 0} img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em} pre{background:#f6f6f6;padding:.8em;overflow:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:0 1.5em}
.wide{grid-column:1/-1}
"""

# Sets data-images on <body> to "<loaded>/<total>" once the page has loaded: a headless browser's
# DOM dump then tells whether every image rendered (the screenshot test reads it).
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
});
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def _summary_table(run_dir: Path) -> str:
    f = run_dir / "summary.json"
    if not f.is_file():
        return "<p>No summary.json (the run has not finished).</p>"
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in json.loads(f.read_text()).items()
    )
    return f"<table>{rows}</table>"


def _figure(rel: str, caption: str, wide: bool) -> str:
    r, c = html.escape(rel), html.escape(caption)
    cls = ' class="wide"' if wide else ""
    return (
        f'<figure{cls}><a href="{r}"><img src="{r}" alt="{c}"></a>'
        f"<figcaption>{c}</figcaption></figure>"
    )


def render(run_dir: Path, written: dict[str, Path | None]) -> str:
    figures, missing = [], []
    for name, caption, _fn in PLOTS:
        p = written.get(name)
        if p is None:
            missing.append(caption)
            continue
        figures.append(_figure(p.relative_to(run_dir).as_posix(), caption, name in WIDE))
    # PNGs other parts of the run put under plots/ (e.g. the per-domain expert load).
    ours = {p for p in written.values() if p is not None}
    for p in sorted((run_dir / "plots").glob("*.png")):
        if p not in ours:
            cap = p.stem.replace("_", " ")
            figures.append(_figure(p.relative_to(run_dir).as_posix(), cap, wide=True))
    cfg = run_dir / "config.yaml"
    cfg_html = (
        f"<details><summary>config.yaml (resolved)</summary><pre>"
        f"{html.escape(cfg.read_text())}</pre></details>"
        if cfg.is_file()
        else ""
    )
    not_recorded = (
        f"<p>Not recorded by this run (so not drawn): {html.escape(', '.join(missing))}.</p>"
        if missing
        else ""
    )
    title = f"sigma-moe run {run_dir.resolve().name}"
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
        f"<script>{_SCRIPT}</script></head><body>"
        f"<h1>{html.escape(title)}</h1><p><code>{html.escape(str(run_dir.resolve()))}</code></p>"
        f"<h2>Summary</h2>{_summary_table(run_dir)}{cfg_html}"
        f"<h2>Plots</h2><div class='grid'>{''.join(figures)}</div>{not_recorded}"
        "</body></html>\n"
    )


def write_report(run_dir: str | Path) -> Path:
    """Plot the run, then write RUN_DIR/report.html; returns the page's path."""
    run_dir = Path(run_dir)
    written = plot_run(run_dir)
    page = run_dir / PAGE
    write_atomic(page, render(run_dir, written))
    return page
