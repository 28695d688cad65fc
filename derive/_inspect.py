"""python -m derive inspect FILE: a table in a form a person can read (and --plot)."""

import json

import numpy as np

from gddim_runtime._format import TableError, read_table

from ._errors import SpecError


def _mat(a):
    return "[" + "; ".join(" ".join(f"{v: .9e}" for v in row) for row in a) + "]"


def describe(tensors, meta, coord=0):
    """Markdown text: provenance, grid, per-step Psi and weights at coordinate ``coord``."""
    t = tensors["t"]
    P = tensors["psi"].shape[1]
    p = min(max(coord, 0), P - 1)
    v = meta.get("verification", {})
    lines = [
        f"<!-- {meta.get('generated', '')} -->",
        f"# Table {meta['spec']['name']}: NFE {meta['nfe']}, order {meta['order']}, grid {meta['grid']['name']}"
        + (f", lam {meta['lam']}" if meta.get("lam") else "") + (", corrector" if meta.get("corrector") else "")
        + (f", polynomial in {meta['variable']}" if meta.get("variable", "t") != "t" else "")
        + (f", form {meta['form']}" if meta.get("form", "eps") != "eps" else ""),
        "",
        f"- command: `{meta['command']}`",
        f"- spec sha256: {meta['spec']['sha256']}",
        f"- state: {meta['spec']['state']} (k = {meta['k']}), coordinates P = {P}, basis {meta['spec']['basis']['kind']}",
        f"- derivation: Psi {meta['kinds']['psi']}, Sigma {meta['kinds']['sigma']}, R {meta['kinds']['R']}",
        f"- NFE accounting: {meta['nfe_accounting']}",
        "- tools: " + ", ".join(f"{k} {val}" for k, val in sorted(meta["tools"].items())),
        "- verification: " + json.dumps(v, sort_keys=True),
        "- tensors: " + ", ".join(f"{n} {list(a.shape)}" for n, a in sorted(tensors.items())),
        "",
        f"Per step (coordinate p = {p}); weights by lag j = 0 (newest, at t_i), 1, ...:",
        "",
        "| i | t_i -> t_i+1 | Psi | eps weights (lag 0, 1, ...) |",
        "|---|---|---|---|",
    ]
    W = tensors["eps_weights"]
    for i in range(len(t) - 1):
        ws = " ".join(_mat(W[i, j, p]) for j in range(W.shape[1]) if np.any(W[i, j, p]))
        lines.append(f"| {i} | {t[i]:.9g} -> {t[i + 1]:.9g} | {_mat(tensors['psi'][i, p])} | {ws} |")
    lines += ["", f"R(t_0) = {_mat(tensors['R'][0, p])}, R(t_N) = {_mat(tensors['R'][-1, p])}",
              f"Sigma(t_N) = {_mat(tensors['sigma'][-1, p])}",
              f"x0 weights (state, eps) = {_mat(tensors['x0_weights'][0, p])}, {_mat(tensors['x0_weights'][1, p])}"]
    if "x0_weights_ms" in tensors:
        X = tensors["x0_weights_ms"]
        lines += ["", "Data-prediction form: u_i+1 = x0_psi u_i + sum_j x0_weights_ms[i, j] x0hat_i-j "
                      "(x0hat = D^-1 (u - R eps)):", "", "| i | x0_psi | x0 weights (lag 0, 1, ...) |", "|---|---|---|"]
        for i in range(len(t) - 1):
            ws = " ".join(_mat(X[i, j, p]) for j in range(X.shape[1]) if np.any(X[i, j, p]))
            lines.append(f"| {i} | {_mat(tensors['x0_psi'][i, p])} | {ws} |")
    return "\n".join(lines) + "\n"


def plot(tensors, meta, path, coord=0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = tensors["t"]
    p = min(max(coord, 0), tensors["psi"].shape[1] - 1)
    k = meta["k"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [("Psi(t_i+1, t_i)", tensors["psi"][:, p], t[1:]), ("Sigma_t", tensors["sigma"][:, p], t),
              ("R_t (gDDIM factor)", tensors["R"][:, p], t), ("L_t (Cholesky)", tensors["L"][:, p], t)]
    for ax, (title, arr, tt) in zip(axes.flat, panels):
        for a in range(k):
            for b in range(k):
                ax.plot(tt, arr[:, a, b], marker=".", label=f"[{a},{b}]")
        ax.set_title(title)
        ax.set_xlabel("t")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    W = tensors["eps_weights"][:, :, p]
    ax = axes.flat[4]
    for j in range(W.shape[1]):
        ax.plot(t[1:], np.abs(W[:, j]).reshape(len(W), -1).max(axis=1), marker=".", label=f"lag {j}")
    ax.set_title("max |eps weight| per step")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax = axes.flat[5]
    ax.plot(np.arange(len(t) - 1), -np.diff(t), marker=".")
    ax.set_title("step size t_i - t_i+1")
    ax.set_yscale("log")
    fig.suptitle(f"{meta['spec']['name']}: NFE {meta['nfe']}, order {meta['order']}, coordinate {p}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


DESCRIBED = ("spec", "nfe", "order", "steps", "grid", "kinds", "k", "command", "nfe_accounting", "tools")


def check_described(meta, path):
    """TableError naming the meta entries python -m derive writes and inspect / validation read, when missing
    (a KeyError inside them was an 'internal error', exit 3)."""
    missing = [key for key in DESCRIBED if key not in meta]
    if missing:
        raise TableError(f"{path}: meta lacks {missing} (python -m derive writes them; regenerate the table)")


def inspect_main(file, plot_path=None, coord=0):
    """python -m derive inspect FILE: print the table's text (and draw it to ``plot_path``)."""
    from pathlib import Path
    if Path(file).is_dir():
        raise SpecError(file, "table", "is a folder; give a .safetensors table file")
    if plot_path is not None and (Path(plot_path).is_dir() or not Path(plot_path).parent.is_dir()):
        raise SpecError("--plot", "plot", f"{plot_path!r}: " + ("is a folder" if Path(plot_path).is_dir() else
                                                               f"folder {str(Path(plot_path).parent)!r} does not exist"))
    try:
        tensors, meta = read_table(file)
        from gddim_runtime._table import from_tensors
        from_tensors(tensors, meta, path=file)        # the runtime's load checks: a table it would refuse is named
        check_described(meta, file)
    except TableError as exc:
        raise SpecError(file, "table", str(exc).split(": ", 1)[-1]) from None
    P = tensors["psi"].shape[1]
    if not 0 <= coord < P:
        raise SpecError("--coord", "coord", f"must be in 0..{P - 1} (the table's coordinates), got {coord}")
    print(describe(tensors, meta, coord), end="")
    if plot_path:
        plot(tensors, meta, plot_path, coord)
        print(f"plot written to {plot_path}")
    return 0
