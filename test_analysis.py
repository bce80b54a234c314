"""CPU checks of analysis.py: CKA's invariances and a hand-computed case, the similarity matrix, the heatmaps."""
import argparse
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import analysis
from analysis import cka, mean_abs_token_cosine, similarity_matrix
from models import build_model
from runtime import UserError


def test_the_rbf_bandwidth_is_the_median_of_all_squared_distances():
    X = torch.tensor([[0.0], [1.0], [3.0]])  # squared distances 0, 0, 0, 1, 1, 4, 4, 9, 9: median 1
    torch.testing.assert_close(analysis.rbf_kernel(X)[0, 1], torch.exp(torch.tensor(-0.5)))


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_cka_of_a_representation_with_itself_is_one_and_invariant_to_rotation_and_scale(kernel):
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(20, 6, generator=g), torch.randn(20, 4, generator=g)
    assert cka(X, X, kernel) == pytest.approx(1.0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))  # an orthogonal matrix
    base = cka(X, Y, kernel)
    assert 0 < base < 1
    assert cka(X @ Q, Y, kernel) == pytest.approx(base, rel=1e-6)
    assert cka(3.5 * X, Y, kernel) == pytest.approx(base, rel=1e-6)


def test_linear_cka_of_a_hand_computed_pair():
    # centred 1-d features x = (1, 0, −1), y = (1, −1, 0): CKA = (xᵀy)² / (‖x‖²‖y‖²) = 1 / (2·2)
    X, Y = torch.tensor([[1.0], [0.0], [-1.0]]), torch.tensor([[1.0], [-1.0], [0.0]])
    assert cka(X, Y, "linear") == pytest.approx(0.25)
    # the same two as block outputs (N = 3, T = 1, D = 1): the 2 × 2 matrix is [[1, 1/4], [1/4, 1]]
    matrix = similarity_matrix([X[:, :, None], Y[:, :, None]], "cka_linear")
    np.testing.assert_allclose(matrix, [[1.0, 0.25], [0.25, 1.0]])


def test_token_cosine_is_one_for_equal_blocks_and_zero_for_orthogonal_tokens():
    a = torch.randn(2, 3, 4)
    assert mean_abs_token_cosine(a, a) == pytest.approx(1.0)
    assert mean_abs_token_cosine(a, -2 * a) == pytest.approx(1.0)  # |cos|: the sign does not count
    e1, e2 = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    e1[..., 0], e2[..., 1] = 1.0, 1.0
    assert mean_abs_token_cosine(e1, e2) == 0.0


def test_similarity_matrices_are_symmetric_with_a_unit_diagonal():
    blocks = [torch.randn(8, 4, 5) for _ in range(3)]
    for metric in analysis.METRICS:
        matrix = similarity_matrix(blocks, metric)
        assert matrix.shape == (3, 3) and np.allclose(matrix, matrix.T) and np.allclose(np.diag(matrix), 1)
    assert analysis.mean_off_diagonal(np.array([[1.0, 0.2], [0.2, 1.0]])) == pytest.approx(0.2)


def perturbed_model(seed):
    torch.manual_seed(seed)
    model = build_model("SiT-Tiny/4", input_size=8, in_channels=3, num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_heatmaps_and_json_for_two_checkpoints(tmp_path, capsys, monkeypatch):
    for seed in (0, 1):
        model = perturbed_model(seed)
        torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": {"model": "SiT-Tiny/4"},
                    "steps": 100 * (seed + 1)}, tmp_path / f"{seed}.pt")
    args = argparse.Namespace(ckpt=[tmp_path / "0.pt", tmp_path / "1.pt"], weights="ema", metrics=["cka_rbf", "cosine"],
                              num_samples=6, seed=0, t=[0.02], out=tmp_path / "out", device="cpu")
    drawn, real_heatmap = [], analysis.heatmap
    monkeypatch.setattr(analysis, "heatmap", lambda m, title, low, high: drawn.append((title, low, high))
                        or real_heatmap(m, title, low, high))
    analysis.main(args)
    # each picture says its metric, where it was measured, and the run; one fixed colour range for all
    assert drawn == [(f"{metric} at t=0.02 of a 50-step Euler trajectory\n{name}, step {step}, ema weights", 0.0, 1.0)
                     for metric in ("RBF CKA", "mean |token cosine|") for name, step in (("0.pt", 100), ("1.pt", 200))]
    out = capsys.readouterr().out  # progress per checkpoint and per stage
    assert re.search(r"\[1/2\] .*0.pt\n  loading its ema weights\n  block features on 6 samples\n"
                     r"  RBF CKA, mean \|token cosine\| between 8 blocks at t=0.02 of a 50-step Euler trajectory", out)
    assert f"[2/2] {tmp_path / '1.pt'}" in out
    single = real_heatmap(np.eye(8), "x", 0.0, 1.0)
    assert single.size == (28 + 8 * 16 + 12 + 14 + 40, 36 + 8 * 16 + 24)
    assert real_heatmap(np.eye(8), "x" * 100, 0.0, 1.0).width > single.width  # wide enough for its title
    assert Image.open(tmp_path / "out" / "cka_rbf-t0.02.png").size == (2 * single.width, single.height)
    results = json.loads((tmp_path / "out" / "similarity.json").read_text())
    first = results[str(tmp_path / "0.pt")]
    assert first["step"] == 100 and len(first["features"]["t=0.02"]["cosine"]) == 8
    assert {"orthogonality", "mutual_information", "dispersion"} <= first["features"]["t=0.02"]["diversity"].keys()
    # the same inputs for every checkpoint: analysing one checkpoint twice gives the same numbers
    again = analysis.analyse(tmp_path / "0.pt", args, torch.device("cpu"))
    assert again["features"]["t=0.02"]["mean_off_diagonal"] == first["features"]["t=0.02"]["mean_off_diagonal"]


def test_the_weights_flag_picks_the_raw_or_the_ema_weights(tmp_path):
    raw, ema = perturbed_model(0), perturbed_model(1)
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "args": {"model": "SiT-Tiny/4"}}, tmp_path / "a.pt")
    torch.save({"model": ema.state_dict(), "ema": raw.state_dict(), "args": {"model": "SiT-Tiny/4"}}, tmp_path / "b.pt")
    args = argparse.Namespace(ckpt=None, weights="model", metrics=["cka_linear"], num_samples=4, seed=0, t=[0.02],
                              out=tmp_path / "out", device="cpu")
    mean = lambda path, weights: analysis.analyse(path, argparse.Namespace(**{**vars(args), "weights": weights}),  # noqa: E731
                                                  torch.device("cpu"))["features"]["t=0.02"]["mean_off_diagonal"]
    assert mean(tmp_path / "a.pt", "model") == mean(tmp_path / "b.pt", "ema") != mean(tmp_path / "a.pt", "ema")


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "notes.md").write_text("# not weights\n")
    args = argparse.Namespace(ckpt=[tmp_path / "notes.md"], weights="ema", metrics=["cka_linear"], num_samples=4,
                              seed=0, t=[0.02], out=tmp_path / "out", device="cpu")
    with pytest.raises(UserError, match=r"notes.md is not a checkpoint: not a torch file, or a truncated one$"):
        analysis.main(args)


def test_features_along_the_trajectory_are_those_of_its_euler_states(tmp_path):
    torch.manual_seed(0)
    model = perturbed_model(0).eval()
    z, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    features = analysis.trajectory_features(model, z, y, {50, 45})  # t = 1 (z itself) and t = 0.9 (5 steps in)
    x = z.double()
    for k in range(5):  # Euler by hand: dt = −1/50
        x = x - model(x.float(), torch.full((3,), 1 - k / 50), y).double() / 50
    for k, state in ((50, z), (45, x)):
        expected = model(state.float(), torch.full((3,), k / 50), y, return_features=True)[1].blocks
        for a, b in zip(features[k], expected):
            torch.testing.assert_close(a, b)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": {"model": "SiT-Tiny/4"},
                "steps": 1}, tmp_path / "a.pt")
    args = argparse.Namespace(ckpt=[tmp_path / "a.pt"], weights="ema", metrics=["cka_linear"], num_samples=4, seed=0,
                              t=[0.2, 0.8], out=tmp_path / "out", device="cpu")
    analysis.main(args)
    assert (tmp_path / "out" / "cka_linear-t0.2.png").is_file() and (tmp_path / "out" / "cka_linear-t0.8.png").is_file()
    with pytest.raises(UserError, match=r"--t must lie in \[0.01, 1\]"):
        analysis.main(argparse.Namespace(**{**vars(args), "t": [0.004]}))


def test_meanflow_checkpoints_are_analysed_at_r_equal_t(tmp_path):
    torch.manual_seed(0)
    model = build_model("SiT-Tiny/4", input_size=8, in_channels=3, num_classes=5, meanflow=True)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": {"model": "SiT-Tiny/4"},
                "steps": 3}, tmp_path / "mf.pt")
    args = argparse.Namespace(ckpt=[tmp_path / "mf.pt"], weights="ema", metrics=["cka_linear"], num_samples=4, seed=0,
                              t=[0.02], out=tmp_path / "out", device="cpu")
    result = analysis.analyse(tmp_path / "mf.pt", args, torch.device("cpu"))
    assert len(result["features"]["t=0.02"]["cka_linear"]) == 8
