"""A run that scores itself (eval_every, eval_at_end): the scores are ddpm-eval's, they leave the training
untouched, a data set without labels is skipped with a note, and a failing score costs a warning."""

import json

import pytest
import torch
from conftest import TINY, cheap_eval, compose

from ddpm.checkpoint import load_checkpoint
from ddpm.evaluation.evaluate import evaluate
from ddpm.plots import read_metrics
from ddpm.training.loop import train
from ddpm.training.scores import RunScorer, eval_features, scores_at_end

RUN = TINY + ["timesteps=20", "sample_every=0", "forward_n=0"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A 4-step run scored at steps 2 and 4."""
    root = tmp_path_factory.mktemp("scored")
    overrides = RUN + ["steps=4", "log_every=1", "eval_every=2", *cheap_eval(root / "cache")]
    overrides.append("eval.features=[classifier,pixels]")  # and a second feature space, nothing learned
    summary = train(compose("train", overrides), root / "run")
    return root, summary


def test_a_run_scores_itself_every_k_steps_into_eval_json_and_metrics(scored):
    root, summary = scored
    run = root / "run"
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # one loss row per step, as before
    scores = [r for r in rows if "fid_classifier" in r]
    assert [r["step"] for r in scores] == [2, 4]
    for row in scores:
        report = json.loads((run / f"eval/step_{row['step']:06d}/eval.json").read_text())
        assert report["source"]["step"] == row["step"] and report["source"]["weights"] == "ema"
        assert report["n_fake"] == 130 and report["features"]["classifier"]["fid"] == row["fid_classifier"]
        assert row["fid_classifier"] > 0 and row["kid_classifier"] == report["features"]["classifier"]["kid"]
        # beside it, 130 other real digits against the same 200: what a perfect model would score
        assert 0 < row["fid_floor_classifier"] < row["fid_classifier"] / 5
    assert summary["scores"]["fid_classifier"] == scores[-1]["fid_classifier"]
    assert all(r["fid_pixels"] > r["fid_floor_pixels"] > 0 for r in scores)


def test_the_run_s_score_is_the_score_ddpm_eval_gives_its_checkpoint(scored):
    root, summary = scored
    ckpt = root / "run/checkpoints/last.pt"
    report = evaluate(
        compose(
            "eval",
            [
                f"ckpt={ckpt}",
                "n=130",
                "sample_steps=5",
                "n_real=200",
                "kid_subsets=5",
                "kid_subset_size=100",
                "classifier_steps=30",
                f"classifier_cache={root / 'cache'}",
                "batch_size=256",  # the run's sample_batch_size: the same batches, the same images
                f"out={root / 'eval'}",
            ],
        )
    )
    ours = report["features"]["classifier"]
    # the same images and real features through the same code: equal up to the order of float sums
    assert ours["fid"] == pytest.approx(summary["scores"]["fid_classifier"], rel=1e-6)
    assert ours["kid"] == pytest.approx(summary["scores"]["kid_classifier"], rel=1e-6, abs=1e-9)


def test_scoring_leaves_the_training_untouched(scored, tmp_path):
    root, _ = scored
    train(compose("train", RUN + ["steps=4", "log_every=1"]), tmp_path / "plain")
    a = load_checkpoint(root / "run/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "plain/checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_eval_at_end_is_on_for_multirun_jobs_unless_said():
    cfg = compose("train")
    assert cfg.eval_at_end is None
    assert scores_at_end(cfg, multirun=True) and not scores_at_end(cfg, multirun=False)
    cfg.eval_at_end = False
    assert not scores_at_end(cfg, multirun=True)
    cfg.eval_at_end = True
    assert scores_at_end(cfg, multirun=False)


class Unlabelled(torch.utils.data.Dataset):
    labels = None


class Labelled(torch.utils.data.Dataset):
    labels = torch.zeros(1)


def test_a_data_set_without_labels_is_scored_in_inception_features_or_not_at_all(tmp_path):
    cfg = compose("train", ["data=folder", f"data.root={tmp_path}"])
    features, note = eval_features(cfg, Unlabelled())
    assert features == [] and note.startswith("warning: data=folder has no labels")
    assert "eval.inception_weights=PATH" in note
    cfg.eval.inception_weights = str(tmp_path / "w.pth")
    features, note = eval_features(cfg, Unlabelled())
    assert features == ["inception"] and "scored in ['inception']" in note
    labelled = compose("train")
    assert eval_features(labelled, Labelled()) == (["classifier"], None)


def test_a_score_that_fails_is_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("the sampler broke")

    monkeypatch.setattr(RunScorer, "score", broken)
    overrides = RUN + ["steps=2", "eval_at_end=true", *cheap_eval(tmp_path / "cache")]
    summary = train(compose("train", overrides), tmp_path / "run")
    out = capsys.readouterr().out
    assert "warning: step 2: the model could not be scored (RuntimeError: the sampler broke)" in out
    assert "ddpm-eval ckpt=" in out and summary["scores"] is None
    assert (tmp_path / "run/checkpoints/last.pt").is_file()


def test_a_stopped_run_is_not_scored():
    scorer = RunScorer(None, every=2, at_end=True, sampling=None, n=2, seed=0, batch_size=1)
    assert scorer.due(2, last=False, stopping=False) and scorer.due(5, last=True, stopping=False)
    assert not scorer.due(4, last=False, stopping=True) and not scorer.due(3, last=False, stopping=False)
