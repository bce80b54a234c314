"""CPU checks of sample.py: samplers against hand-written loops, guidance, checkpoints, resumable FID batches."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from models import SiT, build_model
from runtime import UserError
from sample import (euler_maruyama_sampler, euler_sampler, guidance_at, load_sampling_model, to_uint8,
                    velocity)


def random_model(seed=0, **kwargs):
    """A tiny SiT (3 × 8 × 8 inputs, 5 classes) with all weights random, so that it outputs something."""
    torch.manual_seed(seed)
    model = build_model("SiT-Tiny/4", input_size=8, in_channels=3, num_classes=5, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    return model


class CountingModel(torch.nn.Module):
    """Wraps a model and records the batch size of every forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.batches = model, []
        self.num_classes, self.y_embedder = model.num_classes, model.y_embedder

    def forward(self, x, t, y):
        self.batches.append(len(x))
        return self.model(x, t, y)

    forward_with_cfg = SiT.forward_with_cfg


@pytest.fixture(scope="module")
def model():
    return random_model()


def inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 3, 4][:n])


# ---------------------------------------------------------------- samplers


def test_euler_equals_a_hand_written_loop(model):
    z, y = inputs()
    x = z.clone()
    with torch.no_grad():
        for k in range(10):  # t = 1, 0.9, …, 0.1; each step dt = −0.1
            t = 1 - k / 10
            x = x - 0.1 * model(x.float(), torch.full((3,), t), y).double()
    torch.testing.assert_close(euler_sampler(model, z, y, num_steps=10), x.float(), rtol=1e-5, atol=1e-5)


def test_heun_equals_a_hand_written_loop(model):
    z, y = inputs()
    x = z.clone()
    v = lambda x, t: model(x.float(), torch.full((3,), t), y).double()  # noqa: E731
    with torch.no_grad():
        for k in range(4):
            t, t_next = 1 - k / 4, 1 - (k + 1) / 4
            euler = x + (t_next - t) * v(x, t)
            x = euler if k == 3 else x + (t_next - t) * (v(x, t) + v(euler, t_next)) / 2  # last step: Euler
    torch.testing.assert_close(euler_sampler(model, z, y, num_steps=4, heun=True), x.float(), rtol=1e-5, atol=1e-5)


def test_sde_with_fixed_noise_equals_a_hand_written_euler_maruyama_sequence(model):
    z, y = inputs()
    eps = [torch.randn(3, 3, 8, 8, dtype=torch.float64) for _ in range(4)]
    drawn = iter(eps)
    result = euler_maruyama_sampler(model, z, y, num_steps=5, noise=lambda like: next(drawn))
    # t: 1, 0.76, 0.52, 0.28, 0.04, then 0. With w = 2t and s = −((1 − t)v + x)/t the drift v − t·s is (2 − t)·v + x.
    times = [1.0, 0.76, 0.52, 0.28, 0.04, 0.0]
    x = z.clone()
    with torch.no_grad():
        for k in range(5):
            t, dt = times[k], times[k + 1] - times[k]
            v = model(x.float(), torch.full((3,), t), y).double()
            x = x + ((2 - t) * v + x) * dt + (np.sqrt(2 * t * abs(dt)) * eps[k] if k < 4 else 0)
    torch.testing.assert_close(result, x.float(), rtol=1e-5, atol=1e-5)


def test_the_sde_makes_num_steps_network_evaluations():
    counting = CountingModel(random_model())
    z, y = inputs()
    euler_maruyama_sampler(counting, z, y, num_steps=7)
    assert counting.batches == [3] * 7


def test_cfg_scale_one_is_the_conditional_prediction(model):
    z, y = inputs()
    t = torch.full((3,), 0.4)
    torch.testing.assert_close(velocity(model, z, 0.4, y, 1.0), model(z.float(), t, y).double())
    # and guidance is v(∅) + s·(v(y) − v(∅)) on all channels
    v_null = model(z.float(), t, torch.full((3,), 5))
    expected = v_null + 2.5 * (model(z.float(), t, y) - v_null)
    torch.testing.assert_close(velocity(model, z, 0.4, y, 2.5), expected.double(), rtol=1e-5, atol=1e-5)


def test_the_guidance_interval_is_inclusive():
    assert guidance_at(0.7, 4.0, (0.0, 0.7)) == 4.0 and guidance_at(0.7 + 1e-9, 4.0, (0.0, 0.7)) == 1.0
    assert guidance_at(0.3, 4.0, (0.3, 0.7)) == 4.0 and guidance_at(0.3 - 1e-9, 4.0, (0.3, 0.7)) == 1.0


@pytest.mark.parametrize("heun", [False, True])
def test_guidance_outside_the_interval_costs_one_forward(heun):
    counting = CountingModel(random_model())
    z, y = inputs()
    euler_sampler(counting, z, y, num_steps=10, cfg_scale=4.0, interval=(0.25, 0.65), heun=heun)
    # steps start at t = 1, 0.9, …, 0.1: those at 0.6, 0.5, 0.4, 0.3 are guided (one forward of 2N), the others not
    guided = [0.25 <= 1 - k / 10 <= 0.65 for k in range(10)]
    per_step = [[6 if g else 3] * (2 if heun and k < 9 else 1) for k, g in enumerate(guided)]
    assert counting.batches == [b for step in per_step for b in step]


def test_a_sit_convention_model_samples_like_sits_own_loop():
    """sit_time=True turns SiT's field (t = 0 noise → t = 1 data, dx/dt = v_SiT) into ours; both loops agree."""
    raw = random_model(seed=3, learn_sigma=True)
    converted = random_model(seed=3, learn_sigma=True, sit_time=True)
    z, y = inputs()
    x = z.clone()
    with torch.no_grad():
        for k in range(8):  # SiT's own Euler loop from t = 0 to 1
            x = x + (1 / 8) * raw(x.float(), torch.full((3,), k / 8), y).double()
    torch.testing.assert_close(euler_sampler(converted, z, y, num_steps=8), x.float(), rtol=1e-5, atol=1e-5)


def test_to_uint8_rounds_as_dit():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255]  # 127.5·x + 128 rounded down, clamped


# ---------------------------------------------------------------- checkpoints


def save_training_checkpoint(path, model, ema, name="SiT-Tiny/4"):
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "step": 7,
                "args": {"model": name}}, path)


def test_loads_training_checkpoints_ema_by_default(tmp_path):
    model, ema = random_model(seed=1, z_dims=[16], encoder_depth=2, sra_depth=3), random_model(seed=2)
    save_training_checkpoint(tmp_path / "ckpt.pt", model, ema)
    loaded, info = load_sampling_model(tmp_path / "ckpt.pt")
    assert info["checkpoint_kind"] == "DiverseDiT training checkpoint" and info["model"] == "SiT-Tiny/4"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.state_dict().items())
    raw, _ = load_sampling_model(tmp_path / "ckpt.pt", weights="model")  # projectors and SRA head are left out
    assert not hasattr(raw, "sra_head") and len(raw.projectors) == 0
    assert all(torch.equal(raw.state_dict()[k], model.state_dict()[k]) for k in raw.state_dict())


def test_loads_bare_sit_and_repa_state_dicts_with_their_time_conventions(tmp_path):
    sit = random_model(seed=4, learn_sigma=True)
    torch.save(sit.state_dict(), tmp_path / "SiT.pt")
    loaded, info = load_sampling_model(tmp_path / "SiT.pt")
    assert info["sit_time"] and info["learn_sigma"] and "SiT state dict" in info["checkpoint_kind"]
    z, y, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([0.3, 0.8])
    torch.testing.assert_close(loaded(z, t, y), -sit(z, 1 - t, y))
    repa = random_model(seed=5, z_dims=[16], encoder_depth=2)
    torch.save(repa.state_dict(), tmp_path / "last.pt")
    loaded, info = load_sampling_model(tmp_path / "last.pt")
    assert not info["sit_time"] and "REPA" in info["checkpoint_kind"]
    torch.testing.assert_close(loaded(z, t, y), repa(z, t, y))


def test_checkpoint_errors_say_what_the_file_holds(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_sampling_model(tmp_path / "missing.pt")
    (tmp_path / "notes.md").write_text("# not weights\n")
    with pytest.raises(UserError, match=r"notes.md is not a checkpoint: not a torch file, or a truncated one$"):
        load_sampling_model(tmp_path / "notes.md")
    torch.save({"args": argparse.Namespace(model="SiT-B/2")}, tmp_path / "namespace.pt")
    with pytest.raises(UserError, match=r"namespace.pt .* a torch file holding a pickled argparse.Namespace, which "
                                        r"does not load safely$"):
        load_sampling_model(tmp_path / "namespace.pt")
    torch.save({"optimizer": torch.zeros(1), "lr": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a SiT state dict.*optimizer"):
        load_sampling_model(tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list"):
        load_sampling_model(tmp_path / "list.pt")
    torch.save(random_model(learn_sigma=True).state_dict(), tmp_path / "sit.pt")
    with pytest.raises(ValueError, match="--model: SiT-XL/2, but .* holds the weights of a SiT-Tiny/4"):
        load_sampling_model(tmp_path / "sit.pt", model_name="SiT-XL/2")
    with pytest.raises(ValueError, match="one set of weights"):
        load_sampling_model(tmp_path / "sit.pt", weights="model")
    save_training_checkpoint(tmp_path / "ckpt.pt", random_model(), random_model(), name="SiT-B/2")
    with pytest.raises(ValueError, match="training arguments: SiT-B/2"):
        load_sampling_model(tmp_path / "ckpt.pt")
    torch.save({"model": {}, "ema": {}, "args": [1]}, tmp_path / "args.pt")
    with pytest.raises(ValueError, match="training arguments are a list, not a dict"):
        load_sampling_model(tmp_path / "args.pt")


@pytest.mark.parametrize("kwargs, says", [({}, "learn_sigma=False, projectors=False"),
                                          ({"long_residual": True, "learn_sigma": True}, "skip_linears"),
                                          ({"learn_sigma": True, "z_dims": [16], "encoder_depth": 2},
                                           "learn_sigma=True, projectors=True")])
def test_bare_state_dicts_of_unknown_time_convention_are_refused(tmp_path, kwargs, says):
    torch.save(random_model(**kwargs).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match=f"neither the official SiT file .*{says}"):
        load_sampling_model(tmp_path / "bare.pt")
    torch.save({f"module.{k}": v for k, v in random_model().state_dict().items()}, tmp_path / "ddp.pt")
    with pytest.raises(ValueError, match="'module.'"):
        load_sampling_model(tmp_path / "ddp.pt")


# ---------------------------------------------------------------- the script


def sample_args(ckpt, out, **changes):
    return argparse.Namespace(**{
        "ckpt": str(ckpt), "weights": "ema", "model": None, "sampler": "euler", "num_steps": 3, "cfg_scale": 1.5,
        "guidance_low": 0.0, "guidance_high": 0.7, "num_fid_samples": 5, "class_labels": None,
        "images_per_class": 2, "per_proc_batch_size": 2, "seed": 0, "vae": "ema", "precision": "fp32",
        "tf32": True, "sample_dir": str(out), **changes})


@pytest.fixture(scope="module")
def pixel_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "ckpt.pt"
    save_training_checkpoint(path, random_model(seed=6), random_model(seed=7))
    return path


def run_folder(out):
    return next(p for p in out.iterdir() if p.is_dir())


def test_fid_batch_writes_pngs_npz_and_settings(pixel_checkpoint, tmp_path):
    sample.main(sample_args(pixel_checkpoint, tmp_path, sampler="sde"))
    folder = run_folder(tmp_path)
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    arr = np.load(sample.beside(folder, ".npz"))["arr_0"]
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, np.stack([np.asarray(Image.open(p)) for p in pngs]))
    settings = json.loads(sample.beside(folder, ".json").read_text())
    assert settings["sampler"] == "sde" and settings["model_evaluations"] == 3 and settings["seed"] == 0
    assert settings["guidance_interval"] == [0.0, 0.7] and settings["cfg_scale"] == 1.5
    assert len(settings["checkpoint_sha256"]) == 64 and settings["num_samples"] == 5
    assert folder.name == "SiT-Tiny-4-ckpt-ema-sde3-cfg1.5-interval0-0.7-fp32-seed0"


def test_names_say_the_run_and_the_model_once(tmp_path):
    ckpt = tmp_path / "results" / "000-SiT-Tiny-4-diverse" / "checkpoints" / "0000400.pt"
    args = sample_args(ckpt, tmp_path, num_steps=50, cfg_scale=4.0, guidance_high=1.0)
    description = {"model": "SiT-Tiny/4", "in_channels": 3}
    assert sample.run_name(args, description) == "000-SiT-Tiny-4-diverse-0000400-ema-euler50-cfg4-fp32-seed0"
    # a file whose name does not say the model keeps it in front: REPA's last.pt
    args = sample_args(tmp_path / "last.pt", tmp_path, num_steps=50, cfg_scale=1.8, vae="mse")
    description = {"model": "SiT-XL/2", "in_channels": 4}
    assert (sample.run_name(args, description)
            == "SiT-XL-2-last-ema-euler50-cfg1.8-interval0-0.7-vae-mse-fp32-seed0")


def test_an_interrupted_run_resumes_to_byte_identical_pngs(pixel_checkpoint, tmp_path, monkeypatch):
    sample.main(sample_args(pixel_checkpoint, tmp_path / "whole", sampler="sde"))
    calls = []
    real_generate = sample.generate

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sample, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample.main(sample_args(pixel_checkpoint, tmp_path / "resumed", sampler="sde"))
    folder = run_folder(tmp_path / "resumed")
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png"]
    (folder / "000001.png").unlink()  # also a batch that is only partly written
    monkeypatch.setattr(sample, "generate", real_generate)
    sample.main(sample_args(pixel_checkpoint, tmp_path / "resumed", sampler="sde"))
    whole = run_folder(tmp_path / "whole")
    for i in range(5):
        assert (folder / f"{i:06d}.png").read_bytes() == (whole / f"{i:06d}.png").read_bytes(), i
    assert sample.beside(folder, ".npz").read_bytes() == sample.beside(whole, ".npz").read_bytes()


def test_samples_do_not_depend_on_the_batch_size(pixel_checkpoint, tmp_path):
    sample.main(sample_args(pixel_checkpoint, tmp_path / "a", per_proc_batch_size=5))
    sample.main(sample_args(pixel_checkpoint, tmp_path / "b", per_proc_batch_size=2))
    a, b = (np.load(sample.beside(run_folder(tmp_path / d), ".npz"))["arr_0"] for d in "ab")
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float rounding at most, per-sample randomness


def test_resuming_with_other_settings_is_refused(pixel_checkpoint, tmp_path):
    sample.main(sample_args(pixel_checkpoint, tmp_path, num_fid_samples=2))
    other = tmp_path / "run"
    other.mkdir()
    save_training_checkpoint(other / "ckpt.pt", random_model(seed=8), random_model(seed=9))  # same name, new weights
    with pytest.raises(UserError, match="other settings.*checkpoint"):
        sample.main(sample_args(other / "ckpt.pt", tmp_path, num_fid_samples=2))


def test_grid_has_one_row_per_class(pixel_checkpoint, tmp_path, capsys):
    sample.main(sample_args(pixel_checkpoint, tmp_path, num_fid_samples=None, class_labels=[4, 1, 2]))
    grid = next(tmp_path.glob("*-grid-4-1-2-x2.png"))
    assert Image.open(grid).size == (2 * (8 + 2) + 2, 3 * (8 + 2) + 2)  # 2 columns, 3 rows, 2-pixel padding
    assert json.loads((grid.parent / grid.name.replace(".png", ".json")).read_text())["labels"] == [4, 1, 2]
    # the bar counts images (6, in batches of 2) and shows the network evaluation within a batch (3 Euler steps)
    out, err = capsys.readouterr()
    assert re.search(r"sampling: 100%.* 6/6 \[.*evaluation 3/3 of the batch\]", err)
    assert "classifier" not in out  # not trained on the built-in data
    with pytest.raises(UserError, match="class-labels"):
        sample.main(sample_args(pixel_checkpoint, tmp_path, num_fid_samples=None, class_labels=[5]))


def test_a_grid_of_a_model_trained_on_the_built_in_data_is_checked_by_its_classifier(tmp_path, capsys, monkeypatch):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": random_model().state_dict(), "ema": random_model().state_dict(),
                "args": {"model": "SiT-Tiny/4", "data_path": "builtin:shapes"}}, path)
    # a stand-in for data.shapes_classifier (tested in test_datasets.py, and slow to train) that sees a disk, class 0,
    # in every 8 × 8 image in [-1, 1]
    def always_a_disk(image_size):
        def logits(x):
            assert x.shape[1:] == (3, image_size, image_size) == (3, 8, 8) and -1 <= x.min() <= x.max() <= 1
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()
        return logits

    monkeypatch.setattr(sample, "shapes_classifier", always_a_disk)
    sample.main(sample_args(path, tmp_path, num_fid_samples=None))
    # classes 0–4, 2 images each: the 2 of class 0 are recognised
    assert ("the built-in data's classifier recognises 2/10 samples as their requested shape\n"
            in capsys.readouterr().out)


@pytest.mark.parametrize("changes, error", [({"num_steps": 0}, "--num-steps must be at least 1"),
                                            ({"per_proc_batch_size": 0}, "--per-proc-batch-size"),
                                            ({"class_labels": [1]}, "FID batches draw labels"),
                                            ({"guidance_low": 0.8}, "0 ≤ low ≤ high ≤ 1"),
                                            ({"sampler": "ddim"}, "--sampler ddim: choose one of euler")])
def test_bad_settings_are_refused(pixel_checkpoint, tmp_path, changes, error):
    with pytest.raises(UserError, match=error):
        sample.main(sample_args(pixel_checkpoint, tmp_path, **changes))


def test_the_settings_record_is_replaced_atomically_and_named_when_damaged(pixel_checkpoint, tmp_path, monkeypatch):
    sample.main(sample_args(pixel_checkpoint, tmp_path, num_fid_samples=2))
    folder = run_folder(tmp_path)
    record = sample.beside(folder, ".json")
    written = record.read_text()
    real_write_text = Path.write_text

    def cut_short(self, text, *args, **kwargs):  # a run killed halfway through writing the record
        real_write_text(self, text[:len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(KeyboardInterrupt):
        sample.main(sample_args(pixel_checkpoint, tmp_path, num_fid_samples=2))
    monkeypatch.undo()
    assert record.read_text() == written  # and no temporary is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name, record.name, f"{folder.name}.npz"]
    record.write_text(written[:40])  # damaged by an earlier version, which wrote it in place
    with pytest.raises(UserError, match=f"{re.escape(str(record))} is damaged"):
        sample.main(sample_args(pixel_checkpoint, tmp_path, num_fid_samples=2))


@pytest.mark.parametrize("write", ["grid", "png", "npz", "json"])
def test_a_full_disk_names_the_file_and_leaves_no_temporary(small_disk, tmp_path, write):
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    for i, image in enumerate(images):  # the PNGs an .npz is packed from, on a disk with room
        sample.save_png(image, tmp_path / f"{i:06d}.png")
    with open(small_disk / "ballast", "wb", buffering=0) as ballast, pytest.raises(OSError):  # fill the disk
        while True:
            ballast.write(bytes(4096))
    path = small_disk / f"out.{'npz' if write == 'npz' else 'json' if write == 'json' else 'png'}"
    with pytest.raises(OSError, match=f"no space left while writing {re.escape(str(path))}$"):
        {"grid": lambda: sample.save_grid(images, 2, path), "png": lambda: sample.save_png(images[0], path),
         "npz": lambda: sample.write_npz(tmp_path, 2, path), "json": lambda: sample.save_json({"a": 1}, path)}[write]()
    assert [p.name for p in small_disk.iterdir()] == ["ballast"]


def test_a_user_error_is_one_line_from_the_script(tmp_path):
    (tmp_path / "notes.md").write_text("# not weights\n")
    result = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "notes.md")],
                            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'notes.md'} is not a checkpoint: not a torch file, or a truncated one\n"


def test_bf16_sampling_stays_close_to_float32(pixel_checkpoint, tmp_path):
    sample.main(sample_args(pixel_checkpoint, tmp_path / "fp32"))
    sample.main(sample_args(pixel_checkpoint, tmp_path / "bf16", precision="bf16"))
    a, b = (np.load(sample.beside(run_folder(tmp_path / d), ".npz"))["arr_0"].astype(int) for d in ("fp32", "bf16"))
    assert 0 < np.abs(a - b).max() <= 16 and np.abs(a - b).mean() < 2


def test_latent_models_are_decoded_by_the_vae(sd_vae, tmp_path):
    torch.manual_seed(0)
    model = build_model("SiT-Tiny/2", input_size=4, num_classes=5)  # SD-VAE latents: 4 channels
    save_training_checkpoint(tmp_path / "ckpt.pt", model, model, name="SiT-Tiny/2")
    sample.main(sample_args(tmp_path / "ckpt.pt", tmp_path / "out", num_fid_samples=2, vae=str(sd_vae[1])))
    folder = run_folder(tmp_path / "out")
    assert np.load(sample.beside(folder, ".npz"))["arr_0"].shape == (2, 32, 32, 3)  # 4×4 latents → 32×32 pixels
    # A fresh SiT outputs v = 0, so every sample is its starting noise, decoded (as one batch of two).
    latents = []
    for rng in sample.SampleRandomness(0, [0, 1]).rngs:
        rng.integers(5)  # the label is drawn first
        latents.append(torch.from_numpy(rng.standard_normal((4, 4, 4))).float())
    expected = to_uint8(sd_vae[0].decode(torch.stack(latents) / 0.18215)).numpy()
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(Image.open(folder / f"{i:06d}.png")), expected[i])


def test_two_ranks_under_torchrun_write_the_one_process_files(pixel_checkpoint, tmp_path):
    sample.main(sample_args(pixel_checkpoint, tmp_path / "one"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sample.py",
               "--ckpt", str(pixel_checkpoint), "--num-steps", "3", "--cfg-scale", "1.5", "--guidance-high", "0.7",
               "--num-fid-samples", "5", "--per-proc-batch-size", "2", "--sample-dir", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = run_folder(tmp_path / "one"), run_folder(tmp_path / "two")
    assert one.name == two.name
    for i in range(5):
        assert (one / f"{i:06d}.png").read_bytes() == (two / f"{i:06d}.png").read_bytes(), i
    assert sample.beside(one, ".npz").read_bytes() == sample.beside(two, ".npz").read_bytes()
