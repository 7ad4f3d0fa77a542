"""Numpy "ghost batch normalisation" reference shared by the tests of tests/layers.

Forward output and analytic backward (float64) of batch normalisation applied separately to
contiguous slices of the global batch, one slice per replica group (Ying et al.,
arXiv:1811.06992), written independently of TensorFlow.
"""

import numpy as np

EPSILON = 1e-5


def ghost_bn_numpy(x, w, gamma, beta, group_examples, epsilon=EPSILON):
    """Numpy ghost BN: forward, gradients of `sum(w * y)` and the moving-stat targets.

    Args:
        x: float64 `[batch, ..., channels]`, the global batch.
        w: float64 like `x`, the upstream gradient (loss = sum(w * y)).
        gamma, beta: float64 `[channels]`.
        group_examples: examples per group (contiguous slices of the global batch).

    Returns:
        (y, dx, dgamma, dbeta, mean_over_groups, variance_over_groups).
    """
    y = np.empty_like(x)
    dx = np.empty_like(x)
    dgamma = np.zeros_like(gamma)
    dbeta = np.zeros_like(beta)
    means, variances = [], []
    for start in range(0, x.shape[0], group_examples):
        sl = slice(start, start + group_examples)
        xg = x[sl].reshape(-1, x.shape[-1])
        wg = w[sl].reshape(-1, x.shape[-1])
        m = xg.shape[0]
        mean = xg.mean(axis=0)
        var = ((xg - mean) ** 2).mean(axis=0)
        inv_std = 1.0 / np.sqrt(var + epsilon)
        xhat = (xg - mean) * inv_std
        y[sl] = (gamma * xhat + beta).reshape(x[sl].shape)
        dxhat = wg * gamma
        dxg = inv_std / m * (
            m * dxhat - dxhat.sum(axis=0) - xhat * (dxhat * xhat).sum(axis=0)
        )
        dx[sl] = dxg.reshape(x[sl].shape)
        dgamma += (wg * xhat).sum(axis=0)
        dbeta += wg.sum(axis=0)
        means.append(mean)
        variances.append(var)
    return y, dx, dgamma, dbeta, np.mean(means, axis=0), np.mean(variances, axis=0)
