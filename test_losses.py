"""CPU checks of losses.py against closed forms and hand-computed cases."""
import math

import pytest
import torch
import torch.nn.functional as F

import losses
from losses import (adaptive_weight, dispersion_loss, disploss, diversity_loss, diversity_pairs,
                    mutual_information_loss, orthogonality_loss)


def block(mean_direction, n=4, t=8, noise=0.0, seed=0):
    """A block output (n, t, D) whose batch-and-token mean points along `mean_direction`."""
    g = torch.Generator().manual_seed(seed)
    d = torch.as_tensor(mean_direction, dtype=torch.float32)
    return d.expand(n, t, -1) + noise * torch.randn(n, t, d.numel(), generator=g)


# ---------------------------------------------------------------- flow matching


def test_linear_interpolant_and_velocity_target():
    x, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t, v = losses.interpolate(x, eps, t)
    torch.testing.assert_close(x_t[0], x[0])    # t = 0 is data
    torch.testing.assert_close(x_t[2], eps[2])  # t = 1 is noise
    torch.testing.assert_close(x_t[1], 0.75 * x[1] + 0.25 * eps[1])
    torch.testing.assert_close(v, eps - x)


def test_flow_matching_loss_is_the_per_sample_mean_square():
    v_pred = torch.zeros(2, 4, 2, 2)
    v_target = torch.stack([torch.full((4, 2, 2), 2.0), torch.arange(16.0).view(4, 2, 2)])
    expected = torch.tensor([4.0, sum(k * k for k in range(16)) / 16])
    torch.testing.assert_close(losses.flow_matching_loss(v_pred, v_target), expected)


# ---------------------------------------------------------------- REPA


def test_repa_loss_is_minus_the_mean_token_cosine():
    z = torch.randn(2, 5, 6)
    torch.testing.assert_close(losses.repa_loss([3 * z], [z]), torch.full((2,), -1.0))
    torch.testing.assert_close(losses.repa_loss([-z], [z]), torch.full((2,), 1.0))
    e1, e2 = torch.eye(6)[0].expand(2, 5, 6), torch.eye(6)[1].expand(2, 5, 6)
    torch.testing.assert_close(losses.repa_loss([e1], [e2]), torch.zeros(2))
    # Averaged over encoders: one aligned (−1) and one orthogonal (0) encoder give −1/2.
    torch.testing.assert_close(losses.repa_loss([z, e1], [z, e2]), torch.full((2,), -0.5))


def test_repa_loss_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="does not match"):
        losses.repa_loss([torch.zeros(2, 5, 6)], [torch.zeros(2, 4, 6)])
    with pytest.raises(ValueError, match="one projector per encoder"):
        losses.repa_loss([torch.zeros(2, 5, 6)], [])


# ---------------------------------------------------------------- diversity loss


def test_orthogonality_of_orthogonal_identical_and_opposite_means():
    e = torch.eye(3)
    feats = [block(e[0], noise=0.1), block(e[1], seed=1), block(2 * e[0], seed=2), block(-e[0], seed=3)]
    # Noise of zero mean over (n, t) moves μ only slightly; compare with the cosine of the sampled means.
    mu = [f.mean(dim=(0, 1)) for f in feats]
    torch.testing.assert_close(orthogonality_loss(feats, [(0, 1)]), F.cosine_similarity(mu[0], mu[1], dim=0))
    assert orthogonality_loss(feats, [(1, 2)]).abs() < 1e-6   # orthogonal means → 0
    torch.testing.assert_close(orthogonality_loss(feats, [(2, 3)]), torch.tensor(-1.0))  # signed, not squared
    # Mean over pairs: (0 + 1 + (−1)) / 3 with exact directions.
    exact = [block(e[0]), block(e[1]), block(5 * e[0]), block(-e[0])]
    torch.testing.assert_close(orthogonality_loss(exact, [(0, 1), (0, 2), (0, 3)]), torch.tensor(0.0))
    torch.testing.assert_close(orthogonality_loss(exact, [(0, 2)]), torch.tensor(1.0))


def test_mutual_information_takes_the_absolute_value_per_pair():
    f = torch.randn(3, 8, 6)
    torch.testing.assert_close(mutual_information_loss([f, 2 * f], [(0, 1)]), torch.tensor(1.0))
    torch.testing.assert_close(mutual_information_loss([f, -f], [(0, 1)]), torch.tensor(1.0))  # |−1|
    # Per-token orthogonal blocks → 0, although their batch means may agree.
    e = torch.eye(4)
    a, b = e[0].expand(2, 5, 4), e[1].expand(2, 5, 4)
    torch.testing.assert_close(mutual_information_loss([a, b], [(0, 1)]), torch.tensor(0.0))
    # Half the tokens aligned, half opposite: the signed mean is 0 before the |·|.
    g = torch.cat([f[:, :4], -f[:, 4:]], dim=1)
    assert mutual_information_loss([f, g], [(0, 1)]).abs() < 1e-6
    # |·| is per pair, then the mean over pairs: pairs giving +1 and −1 average to 1, not 0.
    torch.testing.assert_close(mutual_information_loss([f, f, -f], [(0, 1), (0, 2)]), torch.tensor(1.0))


def test_dispersion_by_hand():
    # One block, NT = 2 rows, D = 2. Column 0 = (1, 0) → usage 1/2; column 1 = (1, 1)/√2 → usage 1/√2.
    # a' = (1/√2, 1), variance = ((1 − 1/√2)/2)², divided by 0.25 → (1 − 1/√2)².
    f = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])  # (N=1, T=2, D=2)
    expected = -(1 - 1 / math.sqrt(2)) ** 2
    torch.testing.assert_close(dispersion_loss([f]), torch.tensor(expected))
    # Usage is averaged over blocks before the normalisation: the same block twice changes nothing, and a block
    # of constant columns, usage (1/√2, 1/√2), averages with (1/2, 1/√2) to ((1/2 + 1/√2)/2, 1/√2).
    torch.testing.assert_close(dispersion_loss([f, f]), torch.tensor(expected))
    uniform = torch.ones(1, 2, 2)
    a = torch.tensor([(0.5 + 1 / math.sqrt(2)) / 2, 1 / math.sqrt(2)])
    a = a / a.max()
    torch.testing.assert_close(dispersion_loss([f, uniform]), -((a - a.mean()) ** 2).mean() / 0.25)


def test_dispersion_lies_in_minus_one_to_zero():
    torch.manual_seed(0)
    for scale in (0.01, 1.0, 100.0):
        value = dispersion_loss([scale * torch.randn(2, 8, 16) ** 3 for _ in range(3)])
        assert -1.0 <= value <= 0.0
    # Channels used equally give 0; a two-point usage (1 and 0) gives the extreme −1.
    torch.testing.assert_close(dispersion_loss([torch.ones(2, 3, 4)]), torch.tensor(0.0))
    one_hot_rows = torch.eye(4).repeat(2, 1)[None]  # every column used by 2 of 8 rows: equal usage
    torch.testing.assert_close(dispersion_loss([one_hot_rows]), torch.tensor(0.0))
    two_point = torch.zeros(2, 3, 4)
    two_point[..., :2] = torch.randn(2, 3, 1)  # two equal channels and two dead ones: a' = (1, 1, 0, 0), variance 0.25
    torch.testing.assert_close(dispersion_loss([two_point]), torch.tensor(-1.0))


def test_diversity_loss_is_the_mean_of_its_terms_and_keeps_the_gradient():
    torch.manual_seed(0)
    feats = [torch.randn(2, 8, 16, requires_grad=True) for _ in range(6)]
    pairs = diversity_pairs(6)
    out = diversity_loss(feats, pairs)
    expected = (orthogonality_loss(feats, pairs) + mutual_information_loss(feats, pairs) + dispersion_loss(feats)) / 3
    torch.testing.assert_close(out.total, expected)
    torch.testing.assert_close(out.orthogonality, orthogonality_loss(feats, pairs))
    out.total.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def hand_diversity_terms(feats, pairs):
    """The three terms computed a second way, from sums and norms instead of normalised copies."""
    nt = feats[0].shape[0] * feats[0].shape[1]
    mu = [f.sum(dim=(0, 1)) / nt for f in feats]
    orth = torch.stack([mu[i] @ mu[j] / (mu[i].norm() * mu[j].norm()) for i, j in pairs]).mean()
    mi = torch.stack([((feats[i] * feats[j]).sum(-1) / (feats[i].norm(dim=-1) * feats[j].norm(dim=-1))).sum().abs() / nt
                      for i, j in pairs]).mean()
    # The mean of |x̂| down a column x normalised over its NT rows is ‖x‖₁ / (NT·‖x‖₂).
    usage = torch.stack([f.abs().sum(dim=(0, 1)) / (nt * f.pow(2).sum(dim=(0, 1)).sqrt()) for f in feats]).mean(0)
    a = usage / usage.max()
    disp = -(((a - a.mean()) ** 2).mean() / 0.25).clamp(0, 1)
    return orth, mi, disp


def test_diversity_terms_and_gradients_equal_a_hand_computation():
    torch.manual_seed(0)
    feats = [(torch.randn(3, 5, 7, dtype=torch.float64) + torch.randn(7, dtype=torch.float64)).requires_grad_()
             for _ in range(6)]
    pairs = diversity_pairs(6)
    ours = diversity_loss(feats, pairs)  # in float32
    hand = hand_diversity_terms(feats, pairs)  # in float64
    for term, expected in zip(ours[1:], hand):
        torch.testing.assert_close(term.double(), expected)
    grads = torch.autograd.grad(ours.total, feats)
    hand_grads = torch.autograd.grad(sum(hand) / 3, feats)
    for g, expected in zip(grads, hand_grads):
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-7)


def test_diversity_loss_has_forward_mode_derivatives_equal_to_its_gradient():
    """Forward-mode AD goes through the loss (a custom autograd.Function without a jvp refuses it): ⟨∇L_div, v⟩
    equals torch.func.jvp along v."""
    torch.manual_seed(0)
    feats, tangents = [torch.randn(2, 4, 8) for _ in range(4)], [torch.randn(2, 4, 8) for _ in range(4)]
    total = lambda *f: diversity_loss(list(f), diversity_pairs(4)).total  # noqa: E731
    _, jvp = torch.func.jvp(total, tuple(feats), tuple(tangents))
    grads = torch.autograd.grad(total(*[f.requires_grad_() for f in feats]), feats)
    # check_dtype: forward AD promotes a 0-dim float32 tensor divided by a Python float to float64 (torch 2.x)
    torch.testing.assert_close(jvp, sum((g * v).sum() for g, v in zip(grads, tangents)), check_dtype=False)


def test_zero_columns_and_tokens_give_finite_gradients():
    feats = [torch.randn(2, 3, 4) for _ in range(4)]
    feats[0][:, :, 1] = 0  # a dead channel: its column norm is 0 in L_disp
    feats[1][0, 2] = 0     # a zero token: its norm is 0 in L_MI
    grads = torch.autograd.grad(diversity_loss([f.requires_grad_() for f in feats], diversity_pairs(4)).total, feats)
    assert all(torch.isfinite(g).all() for g in grads)


def test_diversity_loss_is_float32_for_low_precision_features():
    feats = [torch.randn(2, 8, 16).bfloat16() for _ in range(4)]
    out = diversity_loss(feats, diversity_pairs(4))
    assert all(term.dtype == torch.float32 for term in out)
    torch.testing.assert_close(out.total, diversity_loss([f.float() for f in feats], diversity_pairs(4)).total)


def test_non_finite_diversity_loss_becomes_zero():
    feats = [torch.randn(2, 4, 8) for _ in range(4)]
    feats[1][0, 0, 0] = float("nan")
    assert diversity_loss(feats, diversity_pairs(4)).total == 0.0


def test_diversity_loss_has_no_host_device_synchronisation():
    """A `.item()` or a Python branch on a tensor value would break the graph, which fullgraph refuses."""
    feats = [torch.randn(2, 4, 8) for _ in range(8)]
    pairs = diversity_pairs(8, encoder_depth=4)
    compiled = torch.compile(diversity_loss, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(feats, pairs).total, diversity_loss(feats, pairs).total)
    weight = torch.compile(adaptive_weight, backend="eager", fullgraph=True)
    torch.testing.assert_close(weight(torch.tensor(0.3)), torch.tensor(0.4))


@pytest.mark.parametrize("l_div, w, grad_of_w, grad_of_product", [
    (0.05, 0.0, 0.0, 0.0),
    (0.1, 0.0, 0.0, 0.0),   # the boundary belongs to the zero branch
    (0.3, 0.4, 2.0, 1.0),   # d(w·l)/dl = w + l·dw/dl = 0.4 + 0.3·2
    (0.5, 0.8, 2.0, 1.8),   # the boundary belongs to the ramp: w jumps from 0.8 to 1 above it
    (0.7, 1.0, 0.0, 1.0),
])
def test_adaptive_weight_values_and_gradients(l_div, w, grad_of_w, grad_of_product):
    l = torch.tensor(l_div, requires_grad=True)
    torch.testing.assert_close(adaptive_weight(l), torch.tensor(w))
    (g,) = torch.autograd.grad(adaptive_weight(l), l)
    torch.testing.assert_close(g, torch.tensor(grad_of_w))
    (g,) = torch.autograd.grad(adaptive_weight(l) * l, l)  # not detached, as in the release
    torch.testing.assert_close(g, torch.tensor(grad_of_product))


@pytest.mark.parametrize("weight_range, l_div, w", [
    ((0.2, 0.7), 0.2, 0.0), ((0.2, 0.7), 0.45, 0.25 / 0.7), ((0.2, 0.7), 0.7, 0.5 / 0.7), ((0.2, 0.7), 0.71, 1.0),
    ((0.3, 0.9), 0.3, 0.0), ((0.3, 0.9), 0.6, 0.3 / 0.9), ((0.3, 0.9), 0.9, 0.6 / 0.9), ((0.3, 0.9), 0.91, 1.0),
    ((0.1, 0.5), 0.5, 0.8), (None, 0.0, 1.0), (None, 3.0, 1.0),
])
def test_table_8_ranges_ramp_as_lo_over_hi_and_the_constant_weight_is_one(weight_range, l_div, w):
    torch.testing.assert_close(adaptive_weight(torch.tensor(l_div), weight_range), torch.tensor(w))


@pytest.mark.parametrize("kept", [("orth",), ("mi",), ("disp",), ("orth", "disp")])
def test_chosen_terms_keep_their_third_and_alone_get_gradients(kept):
    torch.manual_seed(0)
    feats = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(4)]
    pairs = diversity_pairs(4)
    out = diversity_loss(feats, pairs, terms=kept)
    parts = {"orth": out.orthogonality, "mi": out.mutual_information, "disp": out.dispersion}
    torch.testing.assert_close(out.total, sum(parts[k] for k in kept) / 3)  # λ = 1/3 each, the others 0
    total_grads = torch.autograd.grad(out.total, feats, retain_graph=True)
    kept_grads = [torch.autograd.grad(parts[k], feats, retain_graph=True) for k in kept]
    for i, g in enumerate(total_grads):  # only the kept terms send gradients, each with its 1/3
        torch.testing.assert_close(g, sum(grads[i] for grads in kept_grads) / 3)
    with pytest.raises(ValueError, match="choose one or more of orth, mi, disp"):
        diversity_loss(feats, pairs, terms=())


# ---------------------------------------------------------------- pair sets


def row(i, first, last):
    return [(i, j) for j in range(first, last + 1)]


@pytest.mark.parametrize("depth", [12, 24, 28])
@pytest.mark.parametrize("encoder_depth, expected_12, expected_deep", [
    (None, row(0, 1, 10), row(0, 1, 10)),
    (8, row(1, 2, 11), row(1, 2, 11)),
    (5, row(4, 5, 11) + row(5, 6, 8), row(4, 5, 14)),
    (4, row(5, 6, 11) + row(6, 7, 10), row(5, 6, 15)),
])
def test_pair_sets_reproduce_the_release(depth, encoder_depth, expected_12, expected_deep):
    assert diversity_pairs(depth, encoder_depth) == (expected_12 if depth == 12 else expected_deep)


@pytest.mark.parametrize("layers, expected", [(5, row(0, 1, 5)), (10, row(0, 1, 10)), (15, row(0, 1, 15)),
                                               (20, row(0, 1, 20))])
def test_table_a7_layer_counts_replace_ten_in_the_release_rule(layers, expected):
    assert diversity_pairs(24, layers=layers) == expected  # SiT-L, no REPA: block 0 against blocks 1…K
    assert diversity_pairs(24, 8, layers=10) == diversity_pairs(24, 8)  # K = 10 is today's set
    with pytest.raises(ValueError, match="starts at block"):
        diversity_pairs(24, 8, layers=5)  # with REPA at block 8 the rule would start at block 5 − 8 − 1


def test_all_layers_take_every_pair():
    every = diversity_pairs(24, layers=None)
    assert len(every) == 24 * 23 // 2 and every == sorted(set(every)) and all(i < j for i, j in every)


def test_pair_sets_for_small_models_and_refusals():
    assert diversity_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # all 6 pairs
    with pytest.raises(ValueError, match="starts at block"):
        diversity_pairs(28, encoder_depth=10)
    with pytest.raises(ValueError, match="no block pair"):
        diversity_pairs(8, encoder_depth=2)  # would start at block 7 of 8


def test_explicit_pairs_are_accepted_and_checked():
    feats = [torch.randn(2, 4, 8) for _ in range(5)]
    assert orthogonality_loss(feats, [(0, 4), (2, 3)]).shape == ()
    assert diversity_loss(feats, [(1, 3)]).total.shape == ()
    for bad in ([(3, 1)], [(0, 5)], [(2, 2)], []):
        with pytest.raises(ValueError):
            mutual_information_loss(feats, bad)


# ---------------------------------------------------------------- DispLoss and SRA


def test_dispersive_loss_limits_and_a_two_sample_case():
    b = 8
    far = 1e3 * torch.eye(b)[:, None, :].expand(b, 3, b)   # pairwise squared distance 2e6·3 / (3·8)
    torch.testing.assert_close(disploss(far), torch.tensor(-math.log(b)))
    same = torch.randn(1, 3, 4).expand(b, 3, 4)
    torch.testing.assert_close(disploss(same), torch.tensor(0.0))
    # Two samples at squared distance s·d: log((2 + 2·exp(−s/τ)) / 4).
    z = torch.zeros(2, 2, 3)
    z[1] = 1.0  # ‖z_0 − z_1‖² / d = 6 / 6 = 1
    for tau in (1.0, 0.5):
        torch.testing.assert_close(disploss(z, tau), torch.tensor(math.log((2 + 2 * math.exp(-1 / tau)) / 4)))
    assert disploss(torch.randn(1, 3, 4)) == 0.0  # one sample: nothing to disperse


def test_sra_loss_is_smooth_l1_with_beta_and_stops_the_teacher_gradient():
    # |diff| = 0.01 < β: 0.5·0.01²/0.05 = 0.001;  |diff| = 1 ≥ β: 1 − 0.025 = 0.975.
    student = torch.tensor([[[0.01, 1.0]], [[0.0, 0.0]]], requires_grad=True)  # (N=2, T=1, D=2)
    teacher = torch.zeros(2, 1, 2, requires_grad=True)
    loss = losses.sra_loss(student, teacher)
    torch.testing.assert_close(loss, torch.tensor([(0.001 + 0.975) / 2, 0.0]))
    loss.sum().backward()
    assert teacher.grad is None and student.grad is not None


def test_sra_teacher_time_is_less_noisy_by_at_most_t_max():
    torch.manual_seed(0)
    t = torch.rand(10_000)
    t_teacher = losses.sra_teacher_time(t, t_max=0.2)
    assert (t_teacher <= t).all() and (t_teacher >= (t - 0.2).clamp(min=0)).all()
    assert t_teacher.min() == 0.0  # clamped at the data end
