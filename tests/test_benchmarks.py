"""Smoke tests: each benchmark script runs its smallest setting and writes its outputs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
DATA = Path(os.environ.get("LMMJAX_SHARED", BENCH.parents[1] / "shared")) / "data" / "bcogsci"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args], cwd=BENCH, capture_output=True, text=True, timeout=900
    )


@pytest.mark.skipif(not DATA.is_dir(), reason="bcogsci data not available")
def test_hmc_cognitive_smoke(tmp_path):
    out = run("hmc_cognitive.py", "--smoke", "--datasets", "dutch", "stroop",
              "--data-dir", str(DATA), "--out", str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    table = pd.read_csv(tmp_path / "cognitive.csv")
    assert list(table.columns[:9]) == ["dataset", "variant", "seconds", "iter_per_s",
                                       "ess_per_iter_mean", "ess_per_iter_min", "ess_per_s_min",
                                       "divergences", "max_rhat"]  # fmt: skip
    # stroop has one class (M1 = M2 = all) and a formula for sigma
    assert list(zip(table["dataset"], table["variant"], strict=True)) == [
        ("dutch", "none"), ("dutch", "M1"), ("dutch", "M2"), ("dutch", "all"),
        ("stroop", "none"), ("stroop", "M1"),
    ]  # fmt: skip
    assert (table["seconds"] > 0).all()
    assert (tmp_path / "cognitive.png").stat().st_size > 0
    assert "stroop" in (tmp_path / "cognitive.md").read_text()


def test_hmc_cognitive_missing_data_exits_2(tmp_path):
    out = run("hmc_cognitive.py", "--smoke", "--data-dir", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and "bcogsci" in out.stderr


def test_hmc_insteval_smoke(tmp_path):
    out = run("hmc_insteval.py", "--smoke", "--variants", "u3", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    table = pd.read_csv(tmp_path / "insteval.csv")
    assert list(table["variant"]) == ["u3"]
    assert (table["ms_per_grad"] > 0).all()
    text = (tmp_path / "insteval.md").read_text()
    assert "paper s (A40)" in text and "3071" in text  # the paper's u3 seconds


def test_bootstrap_smoke():
    out = run("bootstrap.py", "--nsim", "20", "--skip-lme4")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lmmjax: 20 refits" in out.stdout and "sd_Days|Subject" in out.stdout


@pytest.mark.slow
def test_vs_bambi_quick_smoke(tmp_path):
    out = run("vs_bambi.py", "--quick", "--datasets", "sleepstudy", "--engines", "auto",
              "--repeats", "2", "--out", str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    table = pd.read_csv(tmp_path / "vs_bambi_quick.csv")
    assert list(table["engine"]) == ["auto"] and (table["ess"] > 0).all()
    assert list(table["runs"]) == [2]
    assert table["marginalize"].iloc[0] == "Subject" and "auto / bambi" in out.stdout


def test_vs_bambi_reads_formulas_as_bambi_does():
    spec = importlib.util.spec_from_file_location("vs_bambi", BENCH / "vs_bambi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (module.uncorrelated("y ~ x + (x | g) + (1 | h) + (x || k)")
            == "y ~ x + (x || g) + (1 || h) + (x || k)")  # fmt: skip
