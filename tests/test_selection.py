"""Label-free model selection: the balance signal, and which weights model.safetensors ends up holding."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from imgcluster import selection
from imgcluster.checkpoint import read_metadata
from imgcluster.cli import app
from imgcluster.config import load_preset, resolve_config
from imgcluster.methods import METHODS
from imgcluster.rundir import RunDir, load_model

runner = CliRunner()


def train(*args):
    return runner.invoke(app, ["train", *map(str, args)], catch_exceptions=False)


def test_balance_is_normalised_entropy_of_cluster_sizes():
    assert selection.balance(torch.tensor([0, 1, 2, 3] * 5), 4) == pytest.approx(1.0)
    assert selection.balance(torch.tensor([2] * 9), 4) == pytest.approx(0.0)
    # two of four clusters, equally: log 2 / log 4
    assert selection.balance(torch.tensor([0, 3] * 4), 4) == pytest.approx(0.5)


def test_inference_copy_leaves_the_live_network_alone():
    torch.manual_seed(0)
    cfg = resolve_config((load_preset("cpu-tiny"), "preset"), ({"clusters": 4, "batch_size": 8}, "test"))
    method = METHODS["c3gan"](cfg, torch.device("cpu"))
    side = METHODS["c3gan"].cache_size(cfg)
    batches = [torch.randint(0, 256, (8, side, side, 3), dtype=torch.uint8) for _ in range(2)]
    before = {k: v.clone() for k, v in method.D.state_dict().items()}
    shadow = selection.inference_copy(method, batches)
    assert shadow.D is not method.D and shadow.G is method.G
    assert all(torch.equal(v, method.D.state_dict()[k]) for k, v in before.items())
    changed = [k for k, v in shadow.D.state_dict().items() if "running_mean" in k and not torch.equal(v, before[k])]
    assert changed                                     # the copy's statistics were re-estimated


@pytest.fixture
def scripted_scores(monkeypatch):
    """Selector.score returns these values in turn (regular checkpoints first, the final weights last)."""
    values = []

    def fake(self, method):
        return values.pop(0)

    monkeypatch.setattr(selection.Selector, "score", fake)
    return values


COMMON = ["--clusters", 10, "--preset", "cpu-tiny", "--set", "checkpoint_every=5", "--quiet"]


def test_model_holds_the_best_balanced_checkpoint(mnist_200, tmp_path, scripted_scores):
    out = tmp_path / "run"
    scripted_scores += [0.5, 0.9, 0.3, 0.35, 0.4]     # checkpoints 5, 10, 15, 20; then the final weights
    result = train(mnist_200, *COMMON, "--steps", 20, "--out", out)
    assert result.exit_code == 0
    assert "holds step 10" in result.stderr and "select_model=last" in result.stderr
    assert "between seeds" not in result.stderr        # C3-GAN has no consistency loss to rate seeds by
    meta = read_metadata(out / "model.safetensors")
    assert meta["step"] == "10" and float(meta["cluster_balance"]) == 0.9
    cfg, method = load_model(RunDir(out), torch.device("cpu"))   # a whole, loadable model
    assert cfg.clusters == 10


def test_last_step_stays_unless_its_clusters_collapsed_against_the_best(mnist_200, tmp_path, scripted_scores):
    assert selection.collapsed(0.4, 0.9, 10) and not selection.collapsed(0.88, 0.9, 10)
    # 10 ** (0.9 - 0.72) = 1.51 effective clusters for each of the last step's: just over the margin (1.5);
    # 10 ** 0.17 = 1.48 just under
    assert selection.collapsed(0.72, 0.9, 10) and not selection.collapsed(0.73, 0.9, 10)
    out = tmp_path / "run"
    scripted_scores += [0.5, 0.9, 0.3, 0.35, 0.88]    # the final weights nearly as balanced as step 10's
    result = train(mnist_200, *COMMON, "--steps", 20, "--out", out)
    assert result.exit_code == 0
    assert "holds the last step, 20" in result.stderr and "step 10's 0.900" in result.stderr
    meta = read_metadata(out / "model.safetensors")
    assert meta["step"] == "20" and float(meta["cluster_balance"]) == 0.88
    best = out / "checkpoint" / "best-model.safetensors"
    assert read_metadata(best)["step"] == "10"
    _, method = load_model(RunDir(out), torch.device("cpu"), path=best)    # the passed-over weights load too
    assert not any(p.is_meta for p in method.D.parameters())


def test_best_checkpoint_survives_a_resume(mnist_200, tmp_path, scripted_scores):
    out = tmp_path / "run"
    scripted_scores += [0.5, 0.9, 0.2]                # checkpoints 5, 10; final weights of step 10
    assert train(mnist_200, *COMMON, "--steps", 10, "--out", out).exit_code == 0
    scripted_scores += [0.3, 0.35, 0.4]               # checkpoints 15, 20; final weights
    assert train(mnist_200, "--out", out, "--steps", 20, "--quiet").exit_code == 0
    assert read_metadata(out / "model.safetensors")["step"] == "10"


def test_select_model_last_keeps_the_last_step(mnist_200, tmp_path, scripted_scores):
    out = tmp_path / "run"
    scripted_scores += [0.4]                          # only the final weights are rated
    result = train(mnist_200, *COMMON, "--steps", 20, "--set", "select_model=last", "--out", out)
    assert result.exit_code == 0 and "holds the last step, 20" in result.stderr
    assert read_metadata(out / "model.safetensors")["step"] == "20"
    assert not (out / "checkpoint" / "best-model.safetensors").exists()


def test_recent_mean_averages_the_window_up_to_a_step(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert selection.recent_mean(metrics, "c_aug", 10) is None                      # no file yet
    rows = [{"step": s, "c_aug": float(s)} for s in (100, 200, 300, 400, 500, 600)] + [{"step": 700}]
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 800, "c_au\n')   # a cut-off line
    assert selection.recent_mean(metrics, "c_aug", 600) == pytest.approx(400.0)     # steps 101-600: 200..600
    assert selection.recent_mean(metrics, "c_aug", 250, window=200) == pytest.approx(150.0)   # steps 51-250
    assert selection.recent_mean(metrics, "c_aug", 800) == pytest.approx(500.0)     # 700 lacks the key
    assert selection.recent_mean(metrics, "g_mi", 600) is None
