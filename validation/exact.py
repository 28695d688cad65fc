"""Data whose score is known exactly under any linear SDE: isotropic Gaussian mixtures.

Data x in R^{data_shape} ~ sum_c w_c N(mu_c, c_c^2 I). The state u_t (per coordinate a
k-vector; with a dct2d basis, per frequency of the orthonormal DCT, which keeps isotropic
covariances isotropic) is then a mixture of N(D_t e_0 mu_c, c_c^2 D_t e_0 e_0^T D_t^T + Sigma_t)
with D_t = Psi(t, 0) (or mean_t), e_0 the first state component: every component covariance is
block-diagonal with k x k blocks, so the exact score costs O(C P k^3).

``MixtureScore`` evaluates it in torch from per-coordinate D_t, Sigma_t (taken from a table at
grid index i, or supplied by the caller at any t) and returns eps_R = -R_t^T s.
"""

import math

import torch


class MixtureScore:
    def __init__(self, means, stds, weights=None, basis=("identity", ())):
        """means [C, *data_shape], stds [C] (component std in data space), weights [C]."""
        self.means = means.to(torch.float64)
        C = means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(C)
        w = torch.ones(C, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.log_w = torch.log(w / w.sum())
        self.basis = basis
        if basis[0] == "dct2d":
            from gddim_runtime import dct2
            self.means_c = dct2(self.means)
        else:
            self.means_c = self.means

    def score(self, u, D, Sigma):
        """Exact score in coefficient space. u [B, k, *data] (coefficients), D, Sigma [P, k, k] (P = 1 or H*W).

        The component covariances are block-diagonal with one k x k block per coordinate value
        (P of them), so they are factored once per call ([C, P, k, k]) and applied by einsum;
        coordinate j of the flattened data uses block j mod P (the DCT layout [..., H, W])."""
        B, k = u.shape[:2]
        n = math.prod(u.shape[2:])
        D64, S64 = D.to(torch.float64), Sigma.to(torch.float64)
        P = D64.shape[0]
        m = n // P
        d0 = D64[:, :, 0]                                                  # [P, k]: D_t e_0
        var = self.stds.to(u.device) ** 2
        cov = S64[None] + var[:, None, None, None] * (d0.unsqueeze(-1) * d0.unsqueeze(-2))[None]   # [C, P, k, k]
        chol = torch.linalg.cholesky(cov)
        inv = torch.cholesky_inverse(chol)
        logdet = 2 * m * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(dim=(1, 2))      # [C]
        uf = u.to(torch.float64).reshape(B, k, m, P)
        mu = self.means_c.to(u.device).reshape(-1, m, P)                   # [C, m, P]
        logp, sols = [], []
        for c in range(mu.shape[0]):
            r = uf - d0.T[None, :, None, :] * mu[c][None, None]            # [B, k, m, P]
            sol = torch.einsum("pab,zbmp->zamp", inv[c], r)                # cov^-1 r
            logp.append(self.log_w[c] - 0.5 * (r * sol).sum(dim=(1, 2, 3)) - 0.5 * logdet[c])
            sols.append(sol)
        gamma = torch.softmax(torch.stack(logp), dim=0)                    # [C, B]
        s = -sum(g[:, None, None, None] * sol for g, sol in zip(gamma, sols))
        return s.reshape(u.shape)

class TableModel:
    """A model(u, t) with the exact eps_R at the table's grid times (the runtime's model signature).

    Works in data space like a network would: it transforms to coefficients, evaluates the exact
    score with the table's D_t, Sigma_t and R_t at the matching grid index, and transforms back.
    """

    def __init__(self, mixture, table, parametrization="eps_R"):
        self.mix, self.table, self.parametrization = mixture, table, parametrization
        self.calls = 0

    def _coefficients(self, t):
        """(D_t, Sigma_t, R_t, L_t) per coordinate, at the grid index nearest t."""
        T = self.table.tensors
        i = int(torch.argmin((T["t"] - t.to(torch.float64)).abs()))
        return T["data_to_state"][i], T["sigma"][i], T["R"][i], T["L"][i]

    def __call__(self, x, t):
        from gddim_runtime import dct2, idct2, block_apply
        D, S, R, L = self._coefficients(t[0])
        u = dct2(x.to(torch.float64)) if self.mix.basis[0] == "dct2d" else x.to(torch.float64)
        s = self.mix.score(u, D, S)
        if self.parametrization == "score":
            out = s
        elif self.parametrization == "eps_R":
            out = -block_apply(R.transpose(-1, -2), s, self.mix.basis)
        elif self.parametrization == "eps_L":
            out = -block_apply(L.transpose(-1, -2), s, self.mix.basis)
        elif self.parametrization == "x0":                               # E[[x0; 0]|u_t] = D^-1 (u + Sigma s)
            Dinv = torch.linalg.inv(D)
            out = block_apply(Dinv, u + block_apply(S, s, self.mix.basis), self.mix.basis)
        else:
            raise ValueError(self.parametrization)
        self.calls += 1
        out = idct2(out) if self.mix.basis[0] == "dct2d" else out
        return out.to(x.dtype)


class DenseModel(TableModel):
    """The same exact model at any t, from a dense coefficient file (Sigma_t = L_t L_t^T)."""

    def __init__(self, mixture, dense, parametrization="eps_R"):
        self.mix, self.dense, self.parametrization = mixture, dense, parametrization
        self.calls = 0

    def _coefficients(self, t):
        c = self.dense.at(t)
        return c["D"], c["L"] @ c["L"].transpose(-1, -2), c["R"], c["L"]


def mp_score(u, D, Sigma, means, stds, weights=None):
    """The same exact mixture score in mpmath (any precision): the reference for the torch one.

    u: state as nested lists [k][n] (coefficient space, one sample), D, Sigma: k x k mpmath
    matrices (one coordinate value shared by all n coordinates), means: [C][n], stds: [C].
    Returns the score as [k][n] mpmath numbers.
    """
    import mpmath
    k, n, C = len(u), len(u[0]), len(means)
    w = [mpmath.mpf(1) / C] * C if weights is None else [mpmath.mpf(x) for x in weights]
    d0 = [D[a, 0] for a in range(k)]
    logp, scores = [], []
    for c in range(C):
        cov = Sigma + mpmath.mpf(stds[c]) ** 2 * mpmath.matrix([[d0[a] * d0[b] for b in range(k)] for a in range(k)])
        inv = mpmath.inverse(cov)
        lp = mpmath.log(w[c]) - n * mpmath.log(mpmath.det(cov)) / 2
        sc = [[None] * n for _ in range(k)]
        for j in range(n):
            r = mpmath.matrix([u[a][j] - d0[a] * mpmath.mpf(means[c][j]) for a in range(k)])
            sol = inv * r
            lp -= (r.T * sol)[0] / 2
            for a in range(k):
                sc[a][j] = -sol[a]
        logp.append(lp)
        scores.append(sc)
    top = max(logp)
    g = [mpmath.exp(l - top) for l in logp]
    tot = sum(g)
    return [[sum(g[c] * scores[c][a][j] for c in range(C)) / tot for j in range(n)] for a in range(k)]
