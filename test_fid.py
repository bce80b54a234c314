"""CPU checks of fid.py: closed forms, hand-computed precision / recall, the TF-1 resize, inputs and weights."""
import argparse
import json
import math
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fid
from fid import (FIDInception, frechet_distance, inception_score, load_inception, precision_recall,
                 tf1_resize_bilinear)
from runtime import UserError

PUBLIC_SHAPES = next(iter(json.loads(
    (Path(__file__).parent / "test_data" / "inception_state_dict_shapes.json").read_text()).values()))


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """(a random FID Inception with realistic batch-norm statistics, the .pth file it was loaded from)."""
    torch.manual_seed(0)
    model = FIDInception()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(model.state_dict(), path)
    return load_inception(path), path


# ---------------------------------------------------------------- Fréchet distance


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # singular covariances are expected here
def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 6))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6                         # identical sets
    shift = np.arange(6.0)
    assert frechet_distance(mu + shift, sigma, mu, sigma) == pytest.approx(shift @ shift, rel=1e-6)  # ‖Δμ‖²
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])                       # diagonal covariances:
    expected = 1.0 + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)                            # Σ (√a − √b)² + ‖Δμ‖²
    assert frechet_distance(np.zeros(3), np.diag(s1), np.array([1.0, 0, 0]), np.diag(s2)) == pytest.approx(expected)
    b = rng.standard_normal((500, 6)) * 2
    m2, s2 = b.mean(0), np.cov(b, rowvar=False)
    assert frechet_distance(mu, sigma, m2, s2) == pytest.approx(frechet_distance(m2, s2, mu, sigma), rel=1e-6)
    singular = np.zeros((6, 6))
    assert frechet_distance(mu, singular, mu, singular) == pytest.approx(0.0, abs=1e-5)  # the eps·I fallback
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


# ---------------------------------------------------------------- Inception Score


def test_inception_score_of_uniform_and_one_hot_predictions():
    assert inception_score(np.zeros((50, 1008), np.float32)) == pytest.approx(1.0)
    k = 8
    one_hot = np.full((80, 1008), -30, np.float32)
    one_hot[np.arange(80), np.arange(80) % k] = 0  # confident (e^-30 elsewhere), k classes used equally
    assert inception_score(one_hot) == pytest.approx(k, rel=1e-5)
    # contiguous splits, averaged: a split of 2 classes and a split of 4 → (2 + 4) / 2
    halves = np.full((8, 1008), -30, np.float32)
    halves[np.arange(4), np.arange(4) % 2] = 0
    halves[4 + np.arange(4), np.arange(4)] = 0
    assert inception_score(halves, split_size=4) == pytest.approx(3.0, rel=1e-5)


# ---------------------------------------------------------------- precision and recall


def points(*first_coordinates, dim=2048):
    x = np.zeros((len(first_coordinates), dim), np.float32)
    x[:, 0] = first_coordinates
    return x


@pytest.mark.parametrize("batch", [10_000, 2])
def test_precision_recall_by_hand(batch):
    # k = 1. Reference {0, 1, 3}: squared radii 1, 1, 4. Samples {0.5, 2.5, 10}: radii 4, 4, 56.25.
    # 0.5 is within 1 of 0 (0.25 ≤ 1), 2.5 within 4 of 3 (0.25 ≤ 4), 10 within none → precision 2/3.
    # Every reference point is within 4 of 0.5 or 2.5 → recall 1.
    precision, recall = precision_recall(points(0, 1, 3), points(0.5, 2.5, 10), k=1, batch=batch)
    assert precision == pytest.approx(2 / 3) and recall == 1.0


def test_precision_recall_equal_a_brute_force_count():
    rng = np.random.default_rng(1)
    ref, samples = rng.integers(0, 6, (40, 8)).astype(np.float32), rng.integers(1, 8, (60, 8)).astype(np.float32)

    def brute(centres, others):  # squared distances are small integers: exact in float16 too
        d_self = ((centres[:, None] - centres[None]) ** 2).sum(-1)
        radii = np.sort(d_self, axis=1)[:, 3]  # the 3rd nearest other point (column 0 is the point itself)
        d = ((others[:, None] - centres[None]) ** 2).sum(-1)
        return (d <= radii[None]).any(axis=1).mean()

    precision, recall = precision_recall(ref, samples, batch=16)
    assert precision == pytest.approx(brute(ref, samples)) and recall == pytest.approx(brute(samples, ref))


def test_norms_round_each_square_to_float16_before_the_sum_as_the_evaluator():
    # Five coordinates 1 + 2⁻¹⁰: each square, 1 + 2⁻⁹ + 2⁻²⁰, is 1 + 2⁻⁹ in float16 (tf.square), and five of them
    # make 5 + 2.5·2⁻⁸, halfway between the float16 numbers 5 + 2·2⁻⁸ and 5 + 3·2⁻⁸: the tie goes to the even one.
    # Squares summed in float32 keep 5·2⁻²⁰ above the tie, and the sum rounds up to 5 + 3·2⁻⁸ instead.
    x = torch.full((1, 5), 1 + 2 ** -10)
    assert fid.squared_distances(x, torch.zeros(1, 5)).item() == 5 + 2 * 2 ** -8  # ‖x − 0‖² = ‖x‖²


# ---------------------------------------------------------------- the network and its input


def numpy_tf1_resize(image, size):
    """TensorFlow-1 resize_bilinear written out pixel by pixel: source = d·in/out, no half-pixel offset."""
    channels, height, width = image.shape
    out = np.zeros((channels, size, size), np.float32)
    for i in range(size):
        y = np.float32(i) * np.float32(height / size)
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, height - 1), y - y0
        for j in range(size):
            x = np.float32(j) * np.float32(width / size)
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, width - 1), x - x0
            top = image[:, y0, x0] + (image[:, y0, x1] - image[:, y0, x0]) * fx
            bottom = image[:, y1, x0] + (image[:, y1, x1] - image[:, y1, x0]) * fx
            out[:, i, j] = top + (bottom - top) * fy
    return out


@pytest.mark.parametrize("height, width", [(7, 11), (64, 64), (512, 300)])
def test_tf1_resize_against_numpy(height, width):
    image = np.random.default_rng(0).uniform(0, 255, (3, height, width)).astype(np.float32)
    ours = tf1_resize_bilinear(torch.from_numpy(image)[None], 40)[0].numpy()
    np.testing.assert_allclose(ours, numpy_tf1_resize(image, 40), rtol=0, atol=2e-4)


def test_tf1_resize_to_the_same_size_is_the_identity():
    image = torch.rand(1, 3, 9, 9) * 255
    assert torch.equal(tf1_resize_bilinear(image, 9), image)


def test_state_dict_matches_the_public_weight_file(inception):
    state_dict = inception[0].state_dict()
    assert {k: list(v.shape) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")} == PUBLIC_SHAPES


def test_features_are_pool3_the_mixed_6d_spatial_block_and_unbiased_logits(inception):
    model = inception[0]
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    seen = {}
    hooks = [model.Mixed_6d.branch1x1.register_forward_hook(lambda m, args, out: seen.update(spatial=out)),
             model.Mixed_7c.register_forward_hook(lambda m, args, out: seen.update(last=out))]
    features = model(images)
    for hook in hooks:
        hook.remove()
    assert features.pool.shape == (2, 2048) and features.spatial.shape == (2, 2023)
    spatial = seen["spatial"][:, :7]                                                 # (2, 7, 17, 17)
    assert features.spatial[1, (5 * 17 + 3) * 7 + 2] == spatial[1, 2, 5, 3]       # (h, w, c) order
    torch.testing.assert_close(features.pool, seen["last"].mean(dim=(2, 3)))
    torch.testing.assert_close(features.logits, features.pool @ model.fc.weight.T)  # no bias
    with pytest.raises(ValueError, match="uint8"):
        model(images.float())


def test_the_pool_branches_average_without_padding_and_the_last_block_takes_a_max():
    x = torch.ones(1, 1, 3, 3)
    assert torch.equal(fid.tf_pool(x), torch.ones(1, 1, 3, 3))  # corners average 4 ones, not 4 ones and 5 zeros
    x = torch.arange(9.0).view(1, 1, 3, 3)
    assert fid.tf_pool(x, max_pool=True)[0, 0, 0, 0] == 4


def test_weights_load_the_real_way_and_missing_ones_are_an_error(inception, tmp_path, monkeypatch):
    loaded = load_inception(inception[1])
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), inception[0].state_dict().values()))
    with pytest.raises(UserError, match="pt_inception-2015-12-05"):
        load_inception(tmp_path / "missing.pth")
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "other.pth")
    (tmp_path / "notes.md").write_text("# not weights\n")
    for path in (tmp_path / "other.pth", tmp_path / "notes.md"):
        with pytest.raises(UserError, match=f"^{path} is not the FID Inception's weights") as error:
            load_inception(path)
        assert "weights_only" not in str(error.value) and "\n" not in str(error.value)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match="github.com/mseitzer/pytorch-fid.*--inception PATH"):
        load_inception()


# ---------------------------------------------------------------- inputs and the command


def image_batch(n=5, size=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_npz_and_folder_inputs_give_the_same_features(inception, tmp_path):
    images = image_batch()
    np.savez(tmp_path / "batch.npz", arr_0=images)
    (tmp_path / "folder").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "folder" / f"{i:06d}.png")
    from_npz = fid.extract_features(inception[0], fid.open_source(tmp_path / "batch.npz"), batch_size=2)
    from_folder = fid.extract_features(inception[0], fid.open_source(tmp_path / "folder"), batch_size=3)
    np.testing.assert_allclose(from_npz.pool, from_folder.pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_npz.spatial, from_folder.spatial, rtol=1e-5, atol=1e-6)
    whole = fid.extract_features(inception[0], fid.open_source(tmp_path / "batch.npz"), batch_size=5)
    np.testing.assert_allclose(from_npz.pool, whole.pool, rtol=1e-5, atol=1e-6)  # streamed in pieces or not


def test_bad_inputs_are_clear_errors(tmp_path):
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match="uint8 images of shape"):
        fid.open_source(tmp_path / "float.npz")
    np.savez(tmp_path / "gray.npz", arr_0=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(UserError, match="uint8 images of shape"):
        fid.open_source(tmp_path / "gray.npz")
    np.savez(tmp_path / "other.npz", labels=np.zeros(3))
    with pytest.raises(UserError, match=r"has no images \(arr_0\)"):
        fid.open_source(tmp_path / "other.npz")
    np.save(tmp_path / "bare.npy", np.zeros(3))
    with pytest.raises(UserError, match="bare .npy"):
        fid.open_source(tmp_path / "bare.npy")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="not a readable .npz"):
        fid.open_source(tmp_path / "junk.npz")
    np.savez(tmp_path / "half.npz", arr_0=image_batch(), mu=np.zeros(2048))
    with pytest.raises(UserError, match="carries only"):
        fid.open_source(tmp_path / "half.npz")
    with pytest.raises(UserError, match="neither an .npz file nor a folder"):
        fid.open_source(tmp_path / "nowhere.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        fid.open_source(tmp_path / "empty")
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (9, 9)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(UserError, match="different sizes"):
        list(fid.open_source(tmp_path / "mixed").batches(0, 2, 2))


def test_a_truncated_npz_is_an_error(tmp_path):
    np.savez(tmp_path / "whole.npz", arr_0=image_batch(4))
    data = (tmp_path / "whole.npz").read_bytes()
    source = fid.open_source(tmp_path / "whole.npz")
    # rewrite the header to claim 5 images: the reader runs out of bytes on the fifth
    (tmp_path / "claim.npz").write_bytes(data.replace(b"(4, 24, 24, 3)", b"(5, 24, 24, 3)"))
    claimed = fid.open_source(tmp_path / "claim.npz")
    assert source.count == 4 and claimed.count == 5
    with pytest.raises(UserError, match="truncated"):
        list(claimed.batches(0, 5, 5))


def fid_args(ref, samples, **changes):
    return argparse.Namespace(**{"ref": str(ref), "samples": str(samples),
                                 "inception": None, "batch_size": 4, "out": None, **changes})


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # singular covariances are expected here
def test_the_command_reports_every_metric_and_carried_statistics_are_used(inception, tmp_path, capsys):
    np.savez(tmp_path / "ref.npz", arr_0=image_batch(6, seed=1))
    np.savez(tmp_path / "samples.npz", arr_0=image_batch(7, seed=2))
    fid.main(fid_args(tmp_path / "ref.npz", tmp_path / "samples.npz", inception=inception[1]))
    assert "warning: 7 samples against 6 reference images are not comparable" in capsys.readouterr().err
    results = json.loads((tmp_path / "samples.npz.fid.json").read_text())
    ref = fid.extract_features(inception[0], fid.open_source(tmp_path / "ref.npz"), 4)
    samples = fid.extract_features(inception[0], fid.open_source(tmp_path / "samples.npz"), 4)
    assert results["inception_score"] == pytest.approx(inception_score(samples.logits), rel=1e-6)
    assert (results["precision"], results["recall"]) == precision_recall(ref.pool, samples.pool)
    assert math.isfinite(results["fid"]) and math.isfinite(results["sfid"])
    # Statistics carried by the reference (as ADM's batches carry them), with μ moved by δ, replace those of its
    # images: FID moves by exactly ‖δ‖² − 2·δ·(μ_samples − μ_ref) (the trace is unchanged), the rest stays.
    saved = fid.statistics_of(fid.open_source(tmp_path / "ref.npz"), ref)
    delta = np.linspace(-1, 1, 2048)
    np.savez(tmp_path / "moved.npz", arr_0=image_batch(6, seed=1), **{**saved, "mu": saved["mu"] + delta})
    fid.main(fid_args(tmp_path / "moved.npz", tmp_path / "samples.npz", inception=inception[1],
                      out=tmp_path / "b.json"))
    moved = json.loads((tmp_path / "b.json").read_text())
    gap = samples.pool.mean(axis=0) - saved["mu"]
    assert moved["fid"] == pytest.approx(results["fid"] + delta @ delta - 2 * delta @ gap, rel=1e-5)
    for metric in ("sfid", "inception_score", "precision", "recall"):
        assert moved[metric] == pytest.approx(results[metric], rel=1e-6), metric


def test_inputs_are_checked_before_the_weights_are_loaded_and_too_few_images_are_refused(tmp_path, monkeypatch):
    def load_inception(*args):
        raise AssertionError("the weights were loaded (or downloaded) before the inputs were checked")
    monkeypatch.setattr(fid, "load_inception", load_inception)
    for n in (3, 4):
        np.savez(tmp_path / f"{n}.npz", arr_0=image_batch(n))
    with pytest.raises(UserError, match="nowhere.npz is neither"):
        fid.main(fid_args(tmp_path / "nowhere.npz", tmp_path / "4.npz"))
    for ref, samples in [(3, 4), (4, 3)]:  # precision and recall: a point and its 3 nearest neighbours in each set
        with pytest.raises(UserError, match="3.npz holds 3 image.*precision and recall need at least 4 in each set"):
            fid.main(fid_args(tmp_path / f"{ref}.npz", tmp_path / f"{samples}.npz"))
    with pytest.raises(AssertionError, match="weights were loaded"):
        fid.main(fid_args(tmp_path / "4.npz", tmp_path / "4.npz"))
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        fid.main(fid_args(tmp_path / "4.npz", tmp_path / "4.npz", batch_size=0))


def test_the_command_prints_a_wrong_weight_file_as_one_line(tmp_path):
    np.savez(tmp_path / "a.npz", arr_0=image_batch(4))
    (tmp_path / "README.md").write_text("# not weights\n")
    command = [sys.executable, "fid.py", "--inception", str(tmp_path / "README.md"), str(tmp_path / "a.npz"),
               str(tmp_path / "a.npz")]
    result = subprocess.run(command, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'README.md'} is not the FID Inception's weights (expected the " \
                            f"state dict {fid.INCEPTION_URL})\n"


def test_statistics_carried_by_an_npz_replace_its_images(tmp_path):
    stats = {"mu": np.ones(2048), "sigma": np.eye(2048), "mu_s": np.ones(2023), "sigma_s": np.eye(2023)}
    np.savez(tmp_path / "ref.npz", arr_0=image_batch(2), **stats)
    source = fid.open_source(tmp_path / "ref.npz")
    assert source.count == 2 and source.batches is not None  # its images still serve precision and recall
    carried = fid.statistics_of(source, features=None)
    assert all(np.array_equal(carried[k], stats[k]) for k in stats)


def test_two_ranks_under_torchrun_extract_the_one_process_features_in_order(inception, tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=image_batch(5, seed=3))
    one = fid.extract_features(inception[0], fid.open_source(tmp_path / "ref.npz"), 2)
    script = tmp_path / "extract.py"  # fid.main's steps up to the features, which rank 0 then saves
    script.write_text(f"""import numpy as np, fid, runtime
rank, world_size, device = runtime.init_distributed()
features = fid.extract_features(fid.load_inception({str(inception[1])!r}), fid.open_source({str(tmp_path / "ref.npz")!r}),
                                2, rank, world_size)
if rank == 0:
    np.savez({str(tmp_path / "two.npz")!r}, **features._asdict())
runtime.close_distributed()
""")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run(command, cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = np.load(tmp_path / "two.npz")
    for name, column in one._asdict().items():  # rank 0 extracts images 0–1, rank 1 images 2–4
        np.testing.assert_allclose(two[name], column, rtol=1e-5, atol=1e-6)
