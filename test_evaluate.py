"""CPU checks of evaluate.py: one line per checkpoint, skipped when scored, resumed when interrupted; the built-in
scores against hand-built batches; the ADM path through fid.py's code; the pictures."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import fid
import sample
import train
from data import ShapesDataset

TINY_RUN = ["--model", "SiT-Tiny/4", "--data-path", "builtin:shapes", "--builtin-image-size", "16",
            "--global-batch-size", "8", "--num-workers", "0", "--log-every", "1", "--sample-every", "0",
            "--max-steps", "4", "--save-every", "2", "--keep-last", "2"]
# A dozen samples give singular covariances (the Fréchet distance takes its eps·I fallback, with a warning).
pytestmark = pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
SCORE = ["--sampler", "euler", "--num-steps", "2", "--num-samples", "12", "--milestone-samples", "3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs on the built-in data (SiT and DiverseDiT), each with checkpoints at steps 2 and 4."""
    folder = tmp_path_factory.mktemp("results")
    for switches in ([], ["--diverse"]):
        train.main(train.parse_args(TINY_RUN + switches + ["--results-dir", str(folder)]))
    return sorted(p for p in folder.iterdir() if p.is_dir())


def evaluate_runs(runs, tmp_path, *flags):
    args = evaluate.build_parser().parse_args([*map(str, runs), "--ref", "builtin:shapes", *SCORE,
                                               "--sample-dir", str(tmp_path / "samples"), *flags])
    evaluate.main(args)


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def test_each_checkpoint_is_scored_once_and_the_pictures_are_drawn(runs, tmp_path):
    evaluate_runs(runs, tmp_path, "--out", str(tmp_path / "both.png"))
    first = {run_dir: (run_dir / "eval.jsonl").read_text() for run_dir in runs}
    for run_dir in runs:
        assert [line["step"] for line in lines(run_dir)] == [2, 4]
        assert all(0 <= line["accuracy"] <= 1 and line["frechet_distance"] > 0 for line in lines(run_dir))
        assert (run_dir / "curves.png").is_file()
        assert Image.open(run_dir / "milestones.png").size[1] > 2 * 64  # two rows of ≥ 64-px cells
    assert (tmp_path / "both.png").is_file()
    evaluate_runs(runs, tmp_path)  # already scored: nothing is added
    assert all((run_dir / "eval.jsonl").read_text() == first[run_dir] for run_dir in runs)
    evaluate_runs(runs[:1], tmp_path, "--seed", "1")  # other settings: scored again
    assert [line["seed"] for line in lines(runs[0])] == [0, 0, 1, 1]


def test_an_interrupted_call_continues_where_it_stopped(runs, tmp_path, monkeypatch):
    run_dir = runs[0]
    (run_dir / "eval.jsonl").unlink(missing_ok=True)
    scored = []

    def killed_after_one(npz, seed):
        if scored:
            raise KeyboardInterrupt
        scored.append(npz)
        return {"frechet_distance": 1.0, "accuracy": 0.5, "classifier_held_out_accuracy": 1.0}

    monkeypatch.setattr(evaluate, "builtin_metrics", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        evaluate_runs([run_dir], tmp_path)
    assert [line["step"] for line in lines(run_dir)] == [2]
    monkeypatch.undo()
    evaluate_runs([run_dir], tmp_path)
    assert [line["step"] for line in lines(run_dir)] == [2, 4] and lines(run_dir)[0]["frechet_distance"] == 1.0


def write_npz(images, path):
    np.savez(path, arr_0=images.permute(0, 2, 3, 1).numpy())
    return path


def test_builtin_scores_tell_shapes_of_the_requested_class_from_noise(tmp_path):
    n, seed = 200, 3
    labels = sample.SampleRandomness(seed, range(n)).labels(10)   # the labels sample.py draws for this batch
    shapes = ShapesDataset(10 * n, 16, seed=77, images=True)                   # other shapes than the held-out reference
    right = torch.stack([shapes[10 * i + int(label)][2] for i, label in enumerate(labels)])  # (n, 3, 16, 16) uint8
    wrong = torch.stack([shapes[10 * i + (int(label) + 1) % 10][2] for i, label in enumerate(labels)])
    noise = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scores = {name: evaluate.builtin_metrics(write_npz(images, tmp_path / f"{name}.npz"), seed)
              for name, images in [("right", right), ("wrong", wrong), ("noise", noise)]}
    assert scores["right"]["accuracy"] >= 0.95 and scores["wrong"]["accuracy"] <= 0.05
    assert scores["right"]["classifier_held_out_accuracy"] >= 0.95
    assert scores["right"]["frechet_distance"] < scores["noise"]["frechet_distance"] / 10


def test_the_adm_path_scores_with_fid_py_code(runs, tmp_path, monkeypatch):
    torch.manual_seed(0)
    inception = fid.FIDInception().eval()  # random weights: this checks the plumbing, not the numbers
    monkeypatch.setattr(fid, "load_inception", lambda path, device: inception)
    # ‖Δμ‖² for the Fréchet distance: no 2048-d matrix square root on a CPU (fid.py's own tests check the real one)
    monkeypatch.setattr(fid, "frechet_distance", lambda mu1, sigma1, mu2, sigma2: float(((mu1 - mu2) ** 2).sum()))
    calls, adm_metrics = [], fid.adm_metrics

    def recorded(*inputs):  # fid.py's metrics, with their inputs and result kept for the checks below
        calls.append((inputs, adm_metrics(*inputs)))
        return calls[-1][1]

    monkeypatch.setattr(fid, "adm_metrics", recorded)
    shapes = ShapesDataset(12, 16, seed=5, images=True)
    ref = write_npz(torch.stack([shapes[i][2] for i in range(12)]), tmp_path / "ref.npz")
    (runs[1] / "eval.jsonl").unlink(missing_ok=True)
    evaluate.main(evaluate.build_parser().parse_args([str(runs[1]), "--ref", str(ref), *SCORE,
                                                      "--sample-dir", str(tmp_path / "samples")]))
    assert len(calls) == len(lines(runs[1])) == 2
    for line, ((ref_source, ref_features, samples, sample_features), scores) in zip(lines(runs[1]), calls):
        assert {k: line[k] for k in scores} == scores and line["reference_sha256"] == evaluate.file_sha256(ref)
        assert ref_source.count == 12 and ref_features.pool.shape == sample_features.pool.shape == (12, 2048)
        expected = fid.extract_features(inception, fid.open_source(ref), 64).pool  # the reference's own features
        np.testing.assert_array_equal(ref_features.pool, expected)
