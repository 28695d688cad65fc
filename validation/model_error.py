"""How much model error ``recommend`` should charge for (derive._autogrid.MODEL_ERROR), measured.

    python -m validation.model_error [--collect] [--variant auto|x0-error|auto+quadratic] [--out FILE.md]

(about 1-2 min on 2 cores without --collect; the committed reports: validation/results/model_error.md for the
rule, model_error_x0.md and model_error_quadratic.md for the two alternatives measured and not kept)

The data-blind recommendation ranks its candidates on two-mode proxies whose score is exact. With the
networks of validation.learned it broke (FD 2416 where the paper's table gives 308): the learned eps is off
by 0.3-1.1 % of its size at t >= 0.5 and by 22-42 % at t = 0.05-0.1 (rings networks against the exact
mixture score), and candidates of similar exact-score error multiply such errors by factors tens of times
apart (VP NFE 10: 1.5 to 97 per unit error), which an exact score never shows. ``Proxies.amplification`` measures that multiplication to first
order; this script chooses its weight:

1. the learned side (``--collect``, about 40 min on 2 cores; else the committed JSON): every candidate of
   ``validation.calibrate`` (96) with each of the seven committed networks at NFE 5, 10, 20, on 256 prior
   draws (CPU generator seed 0), endpoint error against the network's own probability flow (dopri5 1e-8):
   validation/results/learned/all_configs.json;
2. the proxy side: per process and NFE, each auto:<q>-grid candidate's exact-score W1 and its
   first-order amplification per unit model error;
3. the rings networks' own eps error against the exact score, per t (``network_error``);
4. for each MODEL_ERROR of SWEEP, the candidate recommend would pick (W1 + MODEL_ERROR * amplification),
   its regret (ratio to the best of the 96 on that network) on the three rings networks (where the weight
   is chosen) and the four digits networks (held out), and on the exact-score rows of
   validation/results/auto_default.csv (seed 0: endpoint and CFD, ratio to the best offered).
"""

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np

import derive
from derive import _autogrid

ROOT = Path(__file__).resolve().parents[1]
LEARNED_JSON = ROOT / "validation" / "results" / "learned" / "all_configs.json"
EXACT_CSV = ROOT / "validation" / "results" / "auto_default.csv"
NFES = (5, 10, 20)
SWEEP = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def collect(path=LEARNED_JSON, log=print):
    """calibrate.evaluate with every committed network at NFES -> {"kind/process/nfe": {"grid|q|variable|sampler":
    {"endpoint", "w1", "energy"}}}, written to ``path`` (JSON, sorted keys)."""
    import torch

    from . import learned as L
    from .calibrate import evaluate, prior_draws, reference
    out = {}
    for kind, names in L.PROCESSES.items():
        for name in names:
            net = L.network(kind, L.Process(name), log)[0].eval()
            d = derive.derive(name)
            first = d.table(nfe=2, order=1, grid="uniform", verify="none").to_runtime()
            x_T = prior_draws(first, 256, L.SHAPES[kind], torch.Generator().manual_seed(0))
            ref = reference(d, net, x_T)
            for nfe in NFES:
                ev = evaluate(d, net, nfe, x_T, ref=ref)
                out[f"{kind}/{name}/{nfe}"] = {"|".join(map(str, k)): v for k, v in ev.items()}
                log(f"{kind} / {name} NFE {nfe}: {len(ev)} configurations")
    path.write_text(json.dumps(out, indent=0, sort_keys=True) + "\n")
    return out


VARIANTS = {
    "auto": "the rule: auto:<q> grids, every eps output off by independent errors of the same rms",
    "x0-error": "measured, not kept: the error constant in x0 instead of eps (every x0 output off by independent "
                "errors of the same rms; eps by R^-1 D times them)",
    "auto+quadratic": "measured, not kept: the quadratic grid offered beside auto:<q> (eps errors)",
}


class X0ErrorProxies(_autogrid.Proxies):
    """The proxies with the model error constant in x0: the x0 output off by model_error * zeta_i (zeta_i
    standard normal [B, n, k], seeded as in ``Proxies._perturbed``), the eps output by -R^-1 D of that
    (eps = R^-1 (u - D x0)), so the eps error grows like 1/rho as t -> 0."""

    def _perturbed(self, st, i, eps, x0, model_error):
        zeta = model_error * np.random.default_rng(1000 + i).standard_normal((len(self.cidx), len(self.z), st.k))
        de = _autogrid._mv(np.linalg.inv(st.R[i][self.cidx]) @ st.D[i][self.cidx], zeta)
        return (lambda u: eps(u) - de), (lambda u: x0(u) + zeta)


def _quadratic(deriv, n_steps, q):
    from derive import _grids
    return _grids.make_grid(_grids.parse_kind("quadratic"), n_steps, deriv)


def proxy_scores(deriv, nfe, variant="auto"):
    """{"grid|q|variable|sampler": (exact-score proxy error, amplification per unit model error)}: recommend's
    two terms (``_autogrid.candidate_scores``, none pruned), in its candidate order; ``variant`` (VARIANTS):
    the rule, or an alternative measured against it."""
    runs = {"auto": [("auto", None, None)], "x0-error": [("auto", X0ErrorProxies(deriv), None)],
            "auto+quadratic": [("auto", None, None), ("quadratic", None, _quadratic)]}[variant]
    out = {}
    for name, proxies, grid in runs:
        exact, amp = _autogrid.candidate_scores(deriv, nfe, model_error=1.0, proxies=proxies, grid=grid)
        out.update({f"{name}|{q}|{variable}|{_autogrid.SAMPLER[(form, corr)]}": (exact[cfg], amp[cfg])
                    for cfg in _autogrid.candidates() if cfg in amp for q, form, variable, corr in [cfg]})
    return out


def pick(scores, model_error):
    """recommend's rule on precomputed scores (ties: the candidate order of ``proxy_scores``)."""
    return min(scores, key=lambda k: scores[k][0] + model_error * scores[k][1])


def _exact_rows():
    """{(setup, nfe): {config key: (endpoint, cfd)}} from auto_default.csv, seed 0, auto and quadratic grids."""
    out = {}
    for r in csv.DictReader(open(EXACT_CSV)):
        if r["seed"] != "0" or r["grid"] not in ("auto", "quadratic"):
            continue
        key = f"{r['grid']}|{r['order']}|{r['variable']}|{_autogrid.SAMPLER[(r['form'], r['corrector'] == '1')]}"
        out.setdefault((r["setup"], int(r["nfe"])), {})[key] = (float(r["endpoint_error"]), float(r["cfd"]))
    return out


def _gm(v):
    return math.exp(sum(math.log(x) for x in v) / len(v)) if all(math.isfinite(x) for x in v) else math.inf


def sweep(learned, variant="auto", log=print):
    """Markdown table: per MODEL_ERROR the regrets (worst, geometric mean, count within 1.2x); an exact-data pick
    that auto_default.csv has no row for is left out of its column and counted as such."""
    from . import bench
    from .bench_auto import SETUPS
    derivs = {}

    def scores(spec, basis, nfe):
        if (spec, basis) not in derivs:
            derivs[(spec, basis)] = (derive.derive(spec).derivation if basis is None
                                     else bench.Tables(spec, basis).deriv, {})
        d, cache = derivs[(spec, basis)]
        if nfe not in cache:
            cache[nfe] = proxy_scores(d, nfe, variant)
            log(f"proxies {spec} {basis or ''} NFE {nfe}")
        return cache[nfe]
    exact = _exact_rows()
    lines = ["| MODEL_ERROR | learned rings (3 nets x NFE 5/10/20): worst / geo. mean / within 1.2x | learned digits "
             "(4 nets, held out): worst / geo. mean / within 1.2x | exact data endpoint (18 points; a pick "
             "without a row in auto_default.csv is left out, see 'of N') | exact data CFD (the same points) |", "|---|---|---|---|---|"]
    detail = []
    for me in SWEEP:
        reg = {"rings": [], "digits": []}
        for case, ev in sorted(learned.items()):
            kind, name, nfe = case.split("/")
            k = pick(scores(name, None, int(nfe)), me)
            best = min(v["endpoint"] for v in ev.values())
            reg[kind].append(ev[k]["endpoint"] / best)
            detail.append(f"| {me:g} | {kind} / {name} | {nfe} | {k.replace('|', ' ')} | {ev[k]['endpoint'] / best:.2f} |")
        ex = [[], []]
        for (setup, nfe), rows in sorted(exact.items()):
            spec, _, _, basis = SETUPS[setup]
            k = pick(scores(spec, basis, nfe), me)
            if k not in rows:
                detail.append(f"| {me:g} | exact {setup} | {nfe} | {k.replace('|', ' ')} | not in auto_default.csv |")
                continue
            for j in (0, 1):
                ex[j].append(rows[k][j] / min(v[j] for v in rows.values()))
            detail.append(f"| {me:g} | exact {setup} | {nfe} | {k.replace('|', ' ')} | {ex[0][-1]:.2f} / CFD {ex[1][-1]:.2f} |")
        cell = lambda v: f"{max(v):.2f} / {_gm(v):.2f} / {sum(x <= 1.2 for x in v)} of {len(v)}"
        lines.append(f"| {me:g} | {cell(reg['rings'])} | {cell(reg['digits'])} | {cell(ex[0])} | {cell(ex[1])} |")
    return "\n".join(lines), "\n".join(["| MODEL_ERROR | case | NFE | pick | ratio to the best |", "|---|---|---|---|---|"]
                                      + detail)


def network_error(times=(1.0, 0.5, 0.37, 0.15, 0.1, 0.05, 0.01, 0.001), n=4096, log=print):
    """Markdown lines: the rings networks' eps error against the exact mixture score, per t: rms |eps_net -
    eps_exact| / rms |eps_exact| on n forward-marginal draws u_t = D_t x0 + R_t eps (x0 from the rings), and the
    same error seen in x0 (x0 = D^-1 (u - R eps); rms per data coordinate of its data component)."""
    import torch

    import gddim_runtime as gr

    from . import learned as L
    from .bench import rings
    from .exact import DenseModel, MixtureScore
    mix = MixtureScore(*rings())
    lines = ["| rings network | " + " | ".join(f"t = {t:g}" for t in times) + " |", "|---" * (len(times) + 1) + "|"]
    for name in L.PROCESSES["rings"]:
        proc = L.Process(name)
        net, exact = L.network("rings", proc, log)[0].eval(), DenseModel(mix, proc.dense)
        g = torch.Generator().manual_seed(1)
        x0 = L.drawer("rings")(n, g).to(torch.float64)
        cells = []
        for t in times:
            tt = torch.full((n,), t, dtype=torch.float64)
            u, _ = gr.add_noise(proc.dense, x0, tt, generator=g)
            with torch.no_grad():
                e_net = net(u.float(), tt.float()).double()
            e = exact(u, tt)
            c = proc.dense.at(torch.tensor(t, dtype=torch.float64))
            dx0 = torch.einsum("ij,njd->nid", torch.linalg.solve(c["D"][0], c["R"][0]), e_net - e)[:, 0]
            cells.append(f"{float((e_net - e).pow(2).sum().sqrt() / e.pow(2).sum().sqrt()):.1e} / "
                         f"{float(dx0.pow(2).mean().sqrt()):.1e}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m validation.model_error", description=__doc__.split("\n")[0])
    p.add_argument("--collect", action="store_true", help=f"re-run every candidate with every network -> {LEARNED_JSON}")
    p.add_argument("--variant", choices=list(VARIANTS), default="auto",
                   help="the rule (default) or an alternative measured against it: " + "; ".join(
                       f"{k}: {v}" for k, v in VARIANTS.items()))
    p.add_argument("--out", default=None, help="write the markdown report here")
    args = p.parse_args(argv)
    learned = collect() if args.collect else json.loads(LEARNED_JSON.read_text())
    summary, detail = sweep(learned, args.variant, log=lambda *a: print(*a, flush=True))
    nets = "\n".join(network_error())
    cmd = "python -m validation.model_error" + ("" if args.variant == "auto" else f" --variant {args.variant}")
    text = (f"# Model error in recommend's score (`{cmd}`)\n\nVariant {args.variant}: {VARIANTS[args.variant]}."
            f"\n\n{summary}\n\n"
            f"## The networks' error against the exact score (4096 draws per t): relative rms of eps / rms in x0\n\n"
            f"{nets}\n\n"
            f"## Every pick\n\n{detail}\n")
    print(summary)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
