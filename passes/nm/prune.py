"""The pruning math: Wanda scores, N:M and unstructured masks, SparseGPT's OBS update. Pure
functions of tensors, called by the calibration and by tests directly."""

from __future__ import annotations

import torch

from sparsec.errors import PassError

from .config import NMWeightsConfig

__all__ = ["wanda_scores", "sparsegpt_prune"]


def wanda_scores(w: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2``."""
    return w.detach().float().abs() * sumsq.float().sqrt().unsqueeze(0)


def _mask(scores: torch.Tensor, cfg: NMWeightsConfig) -> torch.Tensor:
    from sparsec.kernels.nm import nm_mask, unstructured_mask

    if cfg.structure == "nm":
        return nm_mask(scores, cfg.n, cfg.m)
    return unstructured_mask(scores, cfg.sparsity)


@torch.no_grad()
def sparsegpt_prune(w: torch.Tensor, H: torch.Tensor, cfg: NMWeightsConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023) on one layer: ``(pruned weight, mask)``.

    ``H = sum x x^T`` over the layer's calibration inputs. Dead inputs (``H_jj = 0``) get
    ``H_jj = 1`` and their weights are zeroed first, as in the reference implementation.
    Unstructured: within each block the lowest ``sparsity`` fraction of ``w^2/Hinv_jj^2`` per
    row is pruned (the reference's per-block row-wise variant, a close stand-in for its
    global-per-layer choice).
    """
    W = w.detach().to(torch.float64).clone()
    H = H.detach().to(torch.float64).clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += cfg.damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        Hinv = torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError:
        # H = X^T X is singular when the calibration tokens are fewer than the inputs; the
        # damping is what makes it invertible
        raise PassError(f"sparsegpt: the {cols}x{cols} Hessian is not positive definite with damp={cfg.damp}; "
                        "raise damp (0.01 is SparseGPT's) or calibrate on more tokens") from None
    mask = torch.zeros_like(W, dtype=torch.bool)  # True = pruned
    bs = cfg.blocksize
    if cfg.structure == "nm":
        bs = max(cfg.m, bs - bs % cfg.m)  # blocks hold whole groups
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if cfg.structure == "unstructured":
            score = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            k = int(round(score.shape[1] * cfg.sparsity))
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if k:
                mask1.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w_col = W1[:, i]
            d = Hinv1[i, i]
            if cfg.structure == "nm" and i % cfg.m == 0:
                tmp = W1[:, i:i + cfg.m] ** 2 / torch.diag(Hinv1)[i:i + cfg.m].reshape(1, -1) ** 2
                drop = torch.sort(tmp, dim=1, stable=True).indices[:, : cfg.m - cfg.n]
                mask1.scatter_(1, i + drop, True)
            q = w_col.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w_col - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(w.dtype), ~mask
