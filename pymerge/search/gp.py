"""A small Gaussian process for Bayesian optimisation on the unit cube, in numpy.

Matern-5/2 kernel, one length scale; the length scale and the noise are fitted by maximising the log marginal
likelihood over a fixed grid (the signal variance in closed form), so a fit is deterministic and cannot fail to
converge. Targets are standardised. Acquisitions (maximised): expected improvement with margin ξ and the upper
confidence bound μ + √β σ (the paper's eq. 11 and 12).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

LENGTH_SCALES = np.geomspace(0.03, 3.0, 25)
NOISES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1)


def matern52(a: np.ndarray, b: np.ndarray, length: float) -> np.ndarray:
    d = np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0)) * (math.sqrt(5.0) / length)
    return (1.0 + d + d * d / 3.0) * np.exp(-d)


@dataclass
class GaussianProcess:
    x: np.ndarray          # [n, d] in [0, 1]^d
    length: float
    noise: float
    signal: float          # variance of the standardised targets explained by the kernel
    mean: float
    scale: float
    chol: np.ndarray       # Cholesky factor of (K + noise I)
    alpha: np.ndarray      # (K + noise I)^-1 y_standardised

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray) -> "GaussianProcess":
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        mean = float(y.mean())
        scale = float(y.std()) or 1.0
        z = (y - mean) / scale
        n = len(z)
        best = None
        for length in LENGTH_SCALES:
            k = matern52(x, x, length)
            for noise in NOISES:
                try:
                    chol = np.linalg.cholesky(k + noise * np.eye(n))
                except np.linalg.LinAlgError:
                    continue
                alpha = _solve(chol, z)
                signal = max(float(z @ alpha) / n, 1e-12)  # profiled signal variance
                nll = 0.5 * n * math.log(signal) + float(np.log(np.diag(chol)).sum())
                if best is None or nll < best[0] - 1e-12:
                    best = (nll, length, noise, signal, chol, alpha)
        if best is None:
            raise np.linalg.LinAlgError("GP: the kernel matrix is singular for every length scale and noise tried")
        _, length, noise, signal, chol, alpha = best
        return cls(x, float(length), float(noise), signal, mean, scale, chol, alpha)

    def predict(self, q: np.ndarray):
        """Posterior mean and standard deviation of the latent function at q [m, d], in target units."""
        ks = matern52(np.asarray(q, dtype=np.float64), self.x, self.length)
        mu = ks @ self.alpha
        v = np.linalg.solve(self.chol, ks.T) if len(self.x) else ks.T
        var = np.maximum(1.0 - (v * v).sum(0), 1e-12) * self.signal
        return self.mean + self.scale * mu, self.scale * np.sqrt(var)


def _solve(chol, b):
    return np.linalg.solve(chol.T, np.linalg.solve(chol, b))


def expected_improvement(mu, sigma, best: float, xi: float = 0.0):
    gain = mu - best - xi
    z = gain / sigma
    return gain * ndtr(z) + sigma * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def upper_confidence_bound(mu, sigma, beta: float):
    return mu + math.sqrt(beta) * sigma
