"""The paper's evaluation (README, "Evaluating like the paper") from predicted and true distributions."""
import warnings

import numpy as np

# The paper's VGG16 row on AVA, printed next to a run's own figures.
PAPER_VGG16 = {"accuracy": 0.806, "plcc_mean": 0.610, "srcc_mean": 0.592, "plcc_std": 0.205, "srcc_std": 0.202, "emd": 0.051}
HIGH_QUALITY_THRESHOLD = 5.0


def mean_and_std(dists: np.ndarray) -> tuple:
    """Mean score sum_i i*p_i and spread sqrt(sum_i p_i (i - mean)^2) of (N, K) rows over ratings 1..K."""
    dists = np.asarray(dists, dtype=np.float64)
    scores = np.arange(1, dists.shape[1] + 1, dtype=np.float64)
    mean = dists @ scores
    std = np.sqrt((dists * (scores[None, :] - mean[:, None]) ** 2).sum(axis=1))
    return mean, std


def _correlation(fn, a, b) -> float:
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        warnings.warn("correlation of a constant (or single-element) array is undefined; reporting NaN",
                      RuntimeWarning, stacklevel=3)
        return float("nan")
    return float(fn(a, b)[0])


def srcc(a, b) -> float:
    from scipy import stats  # imported when used: 1.3 s of start-up that scoring a folder does not need
    return _correlation(stats.spearmanr, np.asarray(a, np.float64), np.asarray(b, np.float64))


def plcc(a, b) -> float:
    from scipy import stats
    return _correlation(stats.pearsonr, np.asarray(a, np.float64), np.asarray(b, np.float64))


def score_metrics(pred_mean, true_mean, pred_std=None, true_std=None) -> dict:
    """The metrics that need only scores (what a pred.txt file holds)."""
    pred_mean, true_mean = np.asarray(pred_mean, np.float64), np.asarray(true_mean, np.float64)
    out = {"n": int(len(pred_mean)),
           "srcc_mean": srcc(pred_mean, true_mean), "plcc_mean": plcc(pred_mean, true_mean),
           "accuracy": float(np.mean((pred_mean > HIGH_QUALITY_THRESHOLD) == (true_mean > HIGH_QUALITY_THRESHOLD))),
           "mae_mean": float(np.mean(np.abs(pred_mean - true_mean))),
           "rmse_mean": float(np.sqrt(np.mean((pred_mean - true_mean) ** 2)))}
    if pred_std is not None and true_std is not None:
        out["srcc_std"] = srcc(pred_std, true_std)
        out["plcc_std"] = plcc(pred_std, true_std)
    return out


def compute_metrics(pred_dists, true_dists) -> dict:
    """All the metrics (README, "Evaluating like the paper") over (N, 10) predicted and true distributions, every row once."""
    import torch  # here, not at the top: tools.pred_txt needs only score_metrics, and answers --help without torch

    from model.loss import emd_per_sample
    pred = torch.as_tensor(np.asarray(pred_dists), dtype=torch.float64)
    true = torch.as_tensor(np.asarray(true_dists), dtype=torch.float64)
    if pred.shape != true.shape or pred.dim() != 2 or len(pred) == 0:
        raise ValueError(f"metrics need two non-empty (N, K) arrays of one shape, got {tuple(pred.shape)} and {tuple(true.shape)}")
    pm, ps = mean_and_std(pred.numpy())
    tm, ts = mean_and_std(true.numpy())
    out = score_metrics(pm, tm, ps, ts)
    out["emd"] = float(emd_per_sample(pred, true, r=2).mean())
    out["emd_r1"] = float(emd_per_sample(pred, true, r=1).mean())
    return out


def format_table(metrics: dict, reference: dict = PAPER_VGG16, reference_name: str = "paper VGG16") -> str:
    """The paper's table: accuracy, LCC/SRCC of mean and std, EMD; this run next to the reference row."""
    cols = [("accuracy", "accuracy"), ("plcc_mean", "LCC mean"), ("srcc_mean", "SRCC mean"),
            ("plcc_std", "LCC std"), ("srcc_std", "SRCC std"), ("emd", "EMD r=2"), ("emd_r1", "EMD r=1")]
    cols = [(k, name) for k, name in cols if k in metrics]
    width = max(len(reference_name), len("this run"), 8)
    head = f"{'':<{width}} " + " ".join(f"{name:>10}" for _, name in cols)

    def row(label, values):
        cells = [f"{values[k]:>10.4f}" if k in values else f"{'-':>10}" for k, _ in cols]
        return f"{label:<{width}} " + " ".join(cells)

    return "\n".join([head, row("this run", metrics), row(reference_name, reference)]) + f"\n(n = {metrics['n']} images)"
