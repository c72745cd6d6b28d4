"""The HMC paper's own NumPyro models, timed on this machine (not part of lmmjax).

``paper_gradient_ms(checkout, name, variant, data_dir)`` imports one model
script of a checkout of the paper's public code (``lll6924/hamiltonian_lme``,
MIT; its ``npr/*.py`` need ``pyreadr``, ``scikit-learn`` and ``click`` on the
path), builds the script's model arguments from the same data lmmjax reads,
and returns the median time of one jitted value-and-gradient of the potential
NumPyro builds from it, the function its NUTS runs use. Nothing of the
paper's code is copied here: it is imported and run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from hmc_models import load_insteval, median_ms

# (model, variant) -> script of the paper's repository
SCRIPTS = {
    ("insteval", "none"): "inst_eval", ("insteval", "u1"): "inst_eval_marginalized",
    ("insteval", "u2"): "inst_eval_marginalized2", ("insteval", "u3"): "inst_eval_marginalized3",
    ("insteval", "all"): "inst_eval_marginalize_all",
    ("eeg", "none"): "eeg", ("eeg", "M1"): "eeg_marginalized", ("eeg", "M2"): "eeg_marginalized2",
    ("dillonE1", "none"): "dillonE1", ("dillonE1", "M1"): "dillonE1_marginalized",
    ("dillonE1", "M2"): "dillonE1_marginalized2",
}  # fmt: skip


def _codes(col) -> tuple[np.ndarray, int]:
    """Sorted integer codes, as scikit-learn's LabelEncoder gives them."""
    codes, uniq = pd.factorize(col, sort=True)
    return codes.astype(np.int64), len(uniq)


def _module(checkout: Path, script: str):
    root = str(Path(checkout).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)  # the scripts import their ``distribution`` package
    path = Path(root) / "npr" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"paper_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _insteval_args(variant: str) -> tuple:
    df = load_insteval()
    (g0, n_s), (g1, n_d), (g2, n_dept) = (_codes(df[c]) for c in ("s", "d", "dept"))
    zeros = np.zeros(len(df))
    args = [n_s, n_d, n_dept, len(df), g0, g1, g2, zeros, zeros, df["service"].to_numpy(float)]
    if variant == "all":  # the script's eigendecomposition of Z'Z, built here without its loop
        idx = np.stack([g0, g1 + n_s, g2 + n_s + n_d], axis=1)
        n = n_s + n_d + n_dept
        K = np.bincount((idx[:, :, None] * n + idx[:, None, :]).ravel(), minlength=n * n)
        vals, vecs = np.linalg.eigh(K.reshape(n, n).astype(float))
        args += [vals, vecs]
    return (*args, df["y"].to_numpy(float))


def _cognitive_args(name: str, data_dir: Path) -> tuple:
    if name == "eeg":
        df = pd.read_csv(Path(data_dir) / "df_eeg_complete.csv")
        treatment, obs = df["cloze"].to_numpy(float), df["n400"].to_numpy(float)
    else:
        df = pd.read_csv(Path(data_dir) / "df_dillonE1.csv")
        treatment = _codes(df["int"])[0].astype(float)
        obs = df["rt"].to_numpy(float)
    (g1, n_sub), (g2, n_item) = _codes(df["subj"]), _codes(df["item"])
    return n_sub, n_item, len(df), g1, g2, treatment, obs


def paper_gradient_ms(checkout, name: str, variant: str, data_dir=None, repeats: int = 20) -> float:
    """Median ms of one jitted value-and-gradient of the paper's potential (NaN if no script)."""
    import numpyro
    from numpyro.infer.util import initialize_model

    script = SCRIPTS.get((name, variant))
    if script is None:
        return float("nan")
    module = _module(Path(checkout), script)
    args = _insteval_args(variant) if name == "insteval" else _cognitive_args(name, data_dir)
    # the scripts were written for NumPyro 0.14, which did not validate distribution
    # arguments by default (their custom distributions declare arguments they do not set)
    with numpyro.validation_enabled(False):
        info = initialize_model(jax.random.PRNGKey(0), module.model, model_args=args)
        vg = jax.jit(jax.value_and_grad(info.potential_fn))
        jax.block_until_ready(vg(info.param_info.z))
    return median_ms(vg, info.param_info.z, repeats=repeats)
