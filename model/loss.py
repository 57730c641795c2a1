"""Earth Mover's Distance between two distributions over ordered bins."""
import torch


def emd_per_sample(p: torch.Tensor, q: torch.Tensor, r: float = 2.0) -> torch.Tensor:
    """EMD_r of each row: (mean_k |CDF_p(k) - CDF_q(k)|^r)^(1/r).

    p, q: (B, K) or (B, K, 1) distributions (rows sum to 1). Returns (B,) in float32,
    whatever the input dtype, so the loss is exact under mixed precision.
    """
    if p.dim() == 3:
        p = p.squeeze(-1)
    if q.dim() == 3:
        q = q.squeeze(-1)
    if p.shape != q.shape or p.dim() != 2:
        raise ValueError(f"emd: expected two (B, K) tensors of the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    cdf_gap = torch.cumsum(p.float(), dim=1) - torch.cumsum(q.float(), dim=1)  # (B, K)
    return cdf_gap.abs().pow(r).mean(dim=1).pow(1.0 / r)


def emd_loss(p: torch.Tensor, q: torch.Tensor, r: float = 2.0) -> torch.Tensor:
    """Batch mean of the per-sample EMD (the NIMA training loss uses r = 2)."""
    return emd_per_sample(p, q, r).mean()
