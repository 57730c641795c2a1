"""Every --monitor metric: its direction, which epoch becomes best.pth (and epoch-N.pth),
and when its patience runs out. The directions are written here from what each metric
measures, not read from the code: a metric given the wrong direction keeps the worst
epoch as the best."""
import json
import math

import pytest
import torch

import main as main_cli
from conftest import run_main, tiny_train_args
from engine.train.checkpoints import RunState, saved_best_value
from engine.train.options import MONITORS

# +1: higher is better (correlations with the human ratings, accuracy of the high/low
# split); -1: lower is better (distances and errors).
DIRECTION = {
    "val_emd": -1, "val_emd_r1": -1, "val_mae_mean": -1, "val_rmse_mean": -1,
    "val_srcc_mean": +1, "val_plcc_mean": +1, "val_srcc_std": +1, "val_plcc_std": +1, "val_accuracy": +1,
}
EPOCHS, PATIENCE = 5, 3


def test_every_monitor_has_a_direction_here():
    """A new monitor must be added to DIRECTION (and so to every test below)."""
    assert set(MONITORS) == set(DIRECTION)
    action = next(a for a in main_cli.get_args_parser()._actions if a.dest == "monitor")
    assert set(action.choices) == set(DIRECTION) and action.default == "val_emd"


def by_hand(values, direction, patience, epochs):
    """(improved epochs, last epoch run, epochs without improvement at the end): an epoch
    improves when its value is finite and strictly better than the best so far; the run
    stops after the epoch that makes `patience` epochs in a row without improvement."""
    best, improved, without = None, [], 0
    for epoch, value in enumerate(values[:epochs], start=1):
        if math.isfinite(value) and (best is None or direction * value > direction * best):
            best, without = value, 0
            improved.append(epoch)
        else:
            without += 1
        if without >= patience:
            return improved, epoch, without
    return improved, min(len(values), epochs), without


@pytest.mark.parametrize("monitor", sorted(DIRECTION))
def test_run_state_follows_each_metrics_direction(monitor):
    """Goodness 1, 3, 3 (a tie), 2, 5, NaN, 4, written as values of the metric: better
    is larger for +1 metrics and smaller for -1 ones."""
    d = DIRECTION[monitor]
    goodness = [1.0, 3.0, 3.0, 2.0, 5.0, math.nan, 4.0]
    state = RunState()
    flags, counters = [], []
    for epoch, g in enumerate(goodness, start=1):
        flags.append(state.end_epoch(epoch, monitor, d * g if not math.isnan(g) else g))
        counters.append(state.epochs_without_improvement)
    assert flags == [True, True, False, False, True, False, False]
    assert counters == [0, 0, 1, 2, 0, 1, 2]
    assert state.best_value == d * 5.0 and state.epoch == 7


@pytest.mark.parametrize("monitor", sorted(DIRECTION))
def test_old_checkpoints_best_value_per_direction(monitor):
    """Checkpoints before `best_value` stored minus the value for higher-is-better metrics."""
    d = DIRECTION[monitor]
    assert saved_best_value({"best_val_loss": -d * 0.7, "monitor": monitor}) == pytest.approx(0.7)
    assert saved_best_value({"best_val_loss": math.inf, "monitor": monitor}) is None


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("monitor", sorted(DIRECTION))
def test_best_pth_and_patience_for_each_monitor(monitor, demo_data, tmp_path, capsys):
    """A real run monitored on `monitor`: the epochs whose values in metrics.jsonl improve
    (by hand, with the direction above) are the epoch-N.pth files, the last of them is
    best.pth, and the run stops when PATIENCE epochs in a row have not improved."""
    ckpt = tmp_path / "ckpt"
    assert run_main(tiny_train_args(demo_data, ckpt, "--epochs", EPOCHS, "--early_stopping_patience", PATIENCE,
                                    "--monitor", monitor, "--seed", "0")) == 0
    records = [json.loads(line) for line in open(ckpt / "metrics.jsonl")]
    values = [r[monitor] for r in records]
    improved, last_epoch, without = by_hand(values, DIRECTION[monitor], PATIENCE, EPOCHS)
    # The premise: this run's values tell the two directions apart (else a wrong direction would pass).
    assert (improved, last_epoch) != by_hand(values, -DIRECTION[monitor], PATIENCE, EPOCHS)[:2], (monitor, values)

    assert [r["epoch"] for r in records] == list(range(1, last_epoch + 1)), (monitor, values)
    assert sorted(p.name for p in ckpt.glob("epoch-*.pth")) == sorted(f"epoch-{e}.pth" for e in improved), values
    best, last = load(ckpt / "best.pth"), load(ckpt / "last.pth")
    assert best["epoch"] == improved[-1] and best["monitor"] == monitor
    assert best["best_value"] == pytest.approx(values[improved[-1] - 1], abs=1e-9)
    same = load(ckpt / f"epoch-{improved[-1]}.pth")["model"]
    assert all(torch.equal(best["model"][k], same[k]) for k in same)
    assert (last["epoch"], last["epochs_without_improvement"]) == (last_epoch, without)
    stopped = "early stopping" in capsys.readouterr().out
    assert stopped == (without >= PATIENCE)

