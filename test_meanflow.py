"""CPU checks of MeanFlow: the JVP target, the adaptive weight, (t, r) sampling, sampling, and training."""
import argparse

import pytest
import torch

import losses
import sample
import train
from models import build_model
from losses import meanflow_guided_velocity
from sample import meanflow_sampler


def meanflow_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = build_model("SiT-Tiny/4", input_size=8, in_channels=3, num_classes=5, meanflow=True).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    return model


def test_the_jvp_equals_a_finite_difference_of_the_network():
    model = meanflow_model(torch.float64)
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 3, 8, 8, generator=g,
                                                                                    dtype=torch.float64)
    t, r, y = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64), torch.tensor([0.2, 0.1, 0.3], dtype=torch.float64), \
        torch.tensor([0, 1, 2])
    u_fn = lambda z, r, t: model(z, t, y, r=r, drop_labels=False)  # noqa: E731
    u, target = losses.meanflow_target(u_fn, z, r, t, v)
    eps = 1e-3  # central differences along (v, 0, 1); the time embedding computes in float32, hence not smaller
    with torch.no_grad():
        du_dt = (u_fn(z + eps * v, r, t + eps) - u_fn(z - eps * v, r, t - eps)) / (2 * eps)
    torch.testing.assert_close(u, u_fn(z, r, t))
    expected = v - (t - r)[:, None, None, None] * du_dt
    torch.testing.assert_close(target, expected, rtol=1e-3, atol=1e-3)
    assert not target.requires_grad and torch.equal(target[2], v[2])  # r = t: the target is v itself


def test_the_adaptive_weight_is_a_stop_gradient_inverse_of_the_loss():
    u = torch.randn(4, 3, 2, 2, requires_grad=True)
    target = torch.randn(4, 3, 2, 2)
    loss = losses.meanflow_loss(u, target, c=0.01)
    l2 = ((u - target) ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(loss, l2 / (l2 + 0.01))
    loss.sum().backward()
    expected = 2 * (u - target).detach() / (l2.detach() + 0.01)[:, None, None, None]  # w treated as a constant
    torch.testing.assert_close(u.grad, expected)


def test_times_are_ordered_and_r_equals_t_for_three_quarters():
    torch.manual_seed(0)
    t, r = losses.sample_meanflow_times(1000)
    assert ((0 < r) & (r <= t) & (t < 1)).all()
    assert torch.equal(t[:750], r[:750]) and (t[750:] > r[750:]).all()
    # logit-normal(−0.4, 1): the larger of two draws has a logit above −0.4 on average, the smaller below
    assert torch.logit(t).mean() > -0.4 > torch.logit(r[750:]).mean()


def test_one_step_sampling_is_z1_minus_u():
    model = meanflow_model()
    z, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 4])
    one = meanflow_sampler(model, z, y)
    torch.testing.assert_close(one, z - model(z, torch.ones(2), y, r=torch.zeros(2)), rtol=1e-5, atol=1e-5)
    two = meanflow_sampler(model, z, y, num_steps=2)
    half = z - 0.5 * model(z, torch.ones(2), y, r=torch.full((2,), 0.5))
    expected = half - 0.5 * model(half, torch.full((2,), 0.5), y, r=torch.zeros(2))
    assert two.shape == (2, 3, 8, 8)
    torch.testing.assert_close(two, expected, rtol=1e-5, atol=1e-5)


def test_only_meanflow_models_take_r():
    with pytest.raises(ValueError, match="takes r"):
        meanflow_model()(torch.randn(1, 3, 8, 8), torch.ones(1), torch.zeros(1, dtype=torch.long))
    plain = build_model("SiT-Tiny/4", input_size=8, in_channels=3, num_classes=5)
    with pytest.raises(ValueError, match="takes r"):
        plain(torch.randn(1, 3, 8, 8), torch.ones(1), torch.zeros(1, dtype=torch.long), r=torch.zeros(1))
    assert not any(k.startswith("h_embedder") for k in plain.state_dict())


def test_guidance_in_training_follows_the_official_formula():
    model = meanflow_model()
    z, v = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t, y = torch.tensor([0.5, 0.9, 0.5]), torch.tensor([1, 2, 5])  # the third label is the null class (dropped)
    u_fn = lambda z, t, y: model(z, t, y, r=t, drop_labels=False)  # noqa: E731
    guided = meanflow_guided_velocity(u_fn, z, t, y, v, 5, omega=1.0, kappa=0.5, interval=(0.0, 0.7))
    u_cond = model(z, t, y, r=t, drop_labels=False)
    u_null = model(z, t, torch.full_like(y, 5), r=t, drop_labels=False)
    torch.testing.assert_close(guided[0], (v + 0.5 * u_cond - 0.5 * u_null)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(guided[1], v[1]) and torch.equal(guided[2], v[2])  # outside [0, 0.7]; dropped label
    assert meanflow_guided_velocity(u_fn, z, t, y, v, 5) is v


@pytest.mark.parametrize("diverse", [[], ["--diverse"]])
def test_the_tiny_model_trains_and_samples_in_one_step(tmp_path, diverse):
    flags = ["--model", "SiT-Tiny/4", "--data-path", "builtin:shapes", "--builtin-image-size", "16",
             "--global-batch-size", "8", "--num-workers", "0", "--log-every", "3", "--max-steps", "3",
             "--save-every", "3", "--sample-every", "3", "--meanflow", "--results-dir", str(tmp_path), *diverse]
    train.main(train.parse_args(flags))
    run_dir = next(tmp_path.iterdir())
    ckpt = torch.load(run_dir / "checkpoints" / "0000003.pt", weights_only=True)
    assert ckpt["args"]["beta2"] == 0.95 and "h_embedder.mlp.0.weight" in ckpt["ema"]
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert '"fm": ' in metrics and "NaN" not in metrics and (run_dir / "samples" / "0000003.png").is_file()
    assert ('"div": 0.0' in metrics) != bool(diverse)  # the diversity loss runs only with --diverse
    args = argparse.Namespace(ckpt=str(run_dir / "checkpoints" / "0000003.pt"), weights="ema", model=None,
                              sampler="meanflow", num_steps=None, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                              num_fid_samples=2, class_labels=None, images_per_class=2, per_proc_batch_size=2,
                              seed=0, vae="ema", precision="fp32", tf32=True, sample_dir=str(tmp_path / "samples"))
    sample.main(args)
    with pytest.raises(ValueError, match="MeanFlow model: use --sampler meanflow"):
        sample.main(argparse.Namespace(**{**vars(args), "sampler": "euler", "num_steps": None}))


def test_meanflow_refuses_the_other_objectives_and_guidance_without_a_null_class(tmp_path):
    with pytest.raises(ValueError, match="combines with --diverse"):
        train.main(train.parse_args(["--data-path", "builtin:shapes", "--meanflow", "--disploss"]))
    with pytest.raises(ValueError, match="needs the null class"):
        train.main(train.parse_args(["--data-path", "builtin:shapes", "--meanflow", "--class-dropout-prob", "0"]))
