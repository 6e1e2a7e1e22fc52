"""`sigma-moe report RUN_DIR` on short real runs: every plot the run recorded is a valid PNG of
non-trivial size, nothing it did not record is drawn, and report.html references only files
that exist. The `slow` test renders the page in headless Chromium (Debian's `chromium`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _ckpt_util import baseline_run, train_in_process

from sigma_moe import cli
from sigma_moe.config import load_config
from sigma_moe.train.report import write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rho1"))
from _rho1_helpers import make_hf_reference  # noqa: E402

from sigma_moe.rho1.callback import Rho1Callback  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_BYTES = 8_000  # a labelled matplotlib figure at 100 dpi; an empty frame is ~4-6 kB
PLAIN = {"loss", "val_loss", "lr", "throughput", "grad_norm", "expert_load", "balance", "topk"}
RHO1 = {"rho1_selected", "rho1_excess_hist"}


def _check_page(run: Path) -> set[str]:
    """Names of the PNGs the page shows; asserts every reference resolves and is a real PNG."""
    page = (run / "report.html").read_text()
    refs = set(re.findall(r'(?:src|href)="([^"]+)"', page))
    assert refs, page[:500]
    shown = set()
    for ref in refs:
        f = run / ref
        assert f.is_file(), ref
        data = f.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > MIN_BYTES, (ref, len(data))
        shown.add(Path(ref).stem)
    assert {p.stem for p in (run / "plots").glob("*.png")} == shown  # no stale or unlinked PNG
    return shown


def test_report_on_a_short_run(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(baseline_run(), run)
    (run / "plots" / "rho1_selected.png").write_bytes(b"stale")  # from an earlier report
    assert cli.main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith(f"wrote {run / 'report.html'}")
    shown = _check_page(run)
    assert PLAIN <= shown, shown
    # Dropless, no Rho-1, no mixer: those plots are left out (and named as not recorded).
    assert not shown & (RHO1 | {"dropped_tokens", "mix_weight"}), shown
    page = (run / "report.html").read_text()
    assert "Not recorded by this run" in page and "Dropped tokens" in page
    assert "final_loss" in page  # the summary table


def test_report_of_a_rho1_run_has_its_plots(tmp_path):
    ref = make_hf_reference(tmp_path / "ref")
    sets = ["train.max_steps=3", "train.global_batch_size=8", "train.micro_batch_size=4",
            "rho1.mode=excess", "rho1.select_ratio=0.5", f"rho1.reference={ref}",
            "rho1.scorer=inline", "rho1.scorer_batch_size=4", "checkpoint.every=100",
            "train.eval_every=100"]  # fmt: skip
    cfg = load_config("configs/test-tiny.yaml", sets)
    run = tmp_path / "run"
    train_in_process(cfg, run, extra_callbacks=[Rho1Callback(cfg.rho1, run, run_config=cfg)])
    import json

    doc = json.loads((run / "rho1_selection.json").read_text())
    c = doc["counts"]
    n_sel = sum(v for k, v in c.items() if k.startswith("excess_hist/selected/"))
    n_rej = sum(v for k, v in c.items() if k.startswith("excess_hist/rejected/"))
    assert n_sel == c["n_selected"] and n_sel + n_rej == c["n_valid"] and n_sel > 0
    write_report(run)
    shown = _check_page(run)
    assert RHO1 <= shown and {"loss", "lr"} <= shown, shown


def test_report_errors_name_the_folder(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's `chromium` is not installed (apt-get install chromium)")
    run = tmp_path / "run"
    shutil.copytree(baseline_run(), run)
    page = write_report(run)
    n_img = len(re.findall(r"<img ", page.read_text()))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    shot = tmp_path / "report.png"
    r = subprocess.run(
        [*flags, "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.is_file() and shot.stat().st_size > 50_000, r.stderr[-2000:]
    # The page's own script counts the images that decoded (naturalWidth > 0) once loaded.
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert f'data-images="{n_img}/{n_img}"' in dom, dom[:300]
