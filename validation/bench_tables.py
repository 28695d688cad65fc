"""Benchmark: the CLD 50-NFE order-3 table, derive vs the reference code's numerics.

    python -m validation.bench_tables

Side by side in one run: (a) derive's weights (MPFR, adaptive quadrature, rounded once) and
(b) the way the released gDDIM code computes them: R by fixed-step RK4 on a 10^6-point grid,
each weight by a 10^4-node left Riemann sum (float64 numpy; CLD's closed-form Psi and Sigma).
Both are compared with the 45-digit mpmath reference of ``validation`` (all 49 steps).
"""

import math
import time

import mpmath
import numpy as np

from derive import TableRequest, derive
from derive._spec import load_spec

from ._reference import MpReference
from .bench import SDES

BETA, M, GAMMA = 4.0, 0.25, 1.0


def _F():
    return BETA * np.array([[0.0, 1 / M], [-1.0, -GAMMA / M]])


def _psi(t, s):
    """CLD closed form of MATH.md section 6, vectorised over s."""
    a = 2 / math.sqrt(M)
    B = BETA * (t - s)
    e = np.exp(-a * B / 2)
    return np.stack([np.stack([e * (1 + a * B / 2), e * a ** 2 * B / 4], -1),
                     np.stack([-e * B, e * (1 - a * B / 2)], -1)], -2)


def reference_code_weights(times, order, n_rk4=10 ** 6, n_riemann=10 ** 4):
    """R by RK4 on [0, T] (n_rk4 steps, unrolled 2x2 scalar arithmetic), weights by Riemann sums."""
    F = _F()
    g2 = 2 * GAMMA * BETA
    T = times[0]
    h = T / n_rk4
    R = np.empty((n_rk4 + 1, 2, 2))
    r = np.diag([math.sqrt(1e-6), math.sqrt(0.04 * M + 1e-6)])
    a, b, c, d = r[0, 0], r[0, 1], r[1, 0], r[1, 1]
    f00, f01, f10, f11 = F.ravel()

    def rhs(a, b, c, d):     # dR/dt = F R + 1/2 G G^T R^-T, G G^T = diag(0, g2)
        det = a * d - b * c
        # R^-T = [[d, -c], [-b, a]] / det ; only the second row of G G^T R^-T is non-zero
        return (f00 * a + f01 * c, f00 * b + f01 * d,
                f10 * a + f11 * c + 0.5 * g2 * (-b) / det, f10 * b + f11 * d + 0.5 * g2 * a / det)
    R[0] = ((a, b), (c, d))
    for n in range(n_rk4):
        k1 = rhs(a, b, c, d)
        k2 = rhs(a + h / 2 * k1[0], b + h / 2 * k1[1], c + h / 2 * k1[2], d + h / 2 * k1[3])
        k3 = rhs(a + h / 2 * k2[0], b + h / 2 * k2[1], c + h / 2 * k2[2], d + h / 2 * k2[3])
        k4 = rhs(a + h * k3[0], b + h * k3[1], c + h * k3[2], d + h * k3[3])
        a += h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        b += h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        c += h / 6 * (k1[2] + 2 * k2[2] + 2 * k3[2] + k4[2])
        d += h / 6 * (k1[3] + 2 * k2[3] + 2 * k3[3] + k4[3])
        R[n + 1] = ((a, b), (c, d))
    GG = np.diag([0.0, g2])
    W = np.zeros((len(times) - 1, order, 2, 2))
    for i in range(len(times) - 1):
        s, t = times[i], times[i + 1]
        r_nodes = s + (t - s) * np.arange(n_riemann) / n_riemann            # left Riemann sum
        Rn = R[np.clip(np.rint(r_nodes / h).astype(int), 0, n_rk4)]
        integrand = 0.5 * _psi(t, r_nodes) @ GG @ np.linalg.inv(Rn).transpose(0, 2, 1)
        q = min(order, i + 1)
        nodes = [times[i - j] for j in range(q)]
        for j in range(q):
            l = np.ones_like(r_nodes)
            for m_, xm in enumerate(nodes):
                if m_ != j:
                    l *= (r_nodes - xm) / (nodes[j] - xm)
            W[i, j] = (integrand * l[:, None, None]).sum(0) * (t - s) / n_riemann
    return W


def main():
    spec = load_spec(SDES / "cld.yaml")
    request = TableRequest(nfe=50, order=3, grid="quadratic")
    t0 = time.perf_counter()                         # a fresh derivation: the R solve is timed too
    tab = derive(spec).tables([request], verify="none", jobs=1)[0]
    t_ours = time.perf_counter() - t0
    ours, times = tab.tensors["eps_weights"][:, :, 0], [float(x) for x in tab.tensors["t"]]
    t0 = time.perf_counter()
    derive(spec).tables([request], verify="none", jobs=None)
    t_pool = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = reference_code_weights(times, 3)
    t_theirs = time.perf_counter() - t0
    err_ours = err_theirs = 0.0
    with mpmath.workdps(45):
        ref = MpReference(spec)
        tm = [mpmath.mpf(v) for v in times]
        for i in range(len(times) - 1):
            q = min(3, i + 1)
            C = ref.weights(tm[i], tm[i + 1], [tm[i - j] for j in range(q)])
            for j in range(q):
                scale = max(abs(C[j][a, b]) for a in range(2) for b in range(2))
                for W, name in ((ours, "ours"), (theirs, "theirs")):
                    e = max(abs(mpmath.mpf(float(W[i, j, a, b])) - C[j][a, b]) for a in range(2) for b in range(2)) / scale
                    if name == "ours":
                        err_ours = max(err_ours, float(e))
                    else:
                        err_theirs = max(err_theirs, float(e))
    print("| method | time (s) | max rel. error vs 45-digit reference |\n|---|---|---|")
    print(f"| derive (MPFR, adaptive Clenshaw-Curtis, R by collocation), one process | {t_ours:.2f} | {err_ours:.1e} |")
    print(f"| the same as python -m derive runs it (forked workers, all cores) | {t_pool:.2f} | {err_ours:.1e} |")
    print(f"| reference-code numerics (RK4 10^6 + Riemann 10^4, float64) | {t_theirs:.1f} | {err_theirs:.1e} |")
    print(f"speed ratio {t_theirs / t_ours:.1f}x (one process), {t_theirs / t_pool:.1f}x (derive's workers); "
          f"accuracy ratio {err_theirs / err_ours:.1e}x")


if __name__ == "__main__":
    main()
