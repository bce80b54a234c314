"""The training objectives: flow matching, DiverseDiT's representation diversity loss, and its peers' terms.

One function per term. Each returns per-sample (N,) or per-term tensors; train.py weights them in one line.
Every term is computed in float32, whatever the autocast dtype of its inputs (REPA #46 was an fp16 overflow
inside a normalisation).

Shape legend: N batch, T tokens, D width, C, H, W latent channels and size, L blocks, Z encoder width.
"""
import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Time convention (REPA's): t = 0 is data, t = 1 is noise. Official SiT uses the reverse; models.SiT(sit_time=True)
# converts such checkpoints.
DATA_TIME = 0.0
NOISE_TIME = 1.0

DIVERSITY_EPS = 1e-8      # the release's numerical-stability constant in every normalisation
DIVERSITY_LAYERS = 10     # |P|: the release's 10 block pairs (the paper's Appendix B: "10 layers"; Table A7 varies it)
DIVERSITY_TERMS = ("orth", "mi", "disp")  # L_orth, L_MI, L_disp (paper Eq. 15); Tables 7, A8, A9 keep one of them
MAX_DIVERSITY_LOSS = 5.0  # the release clamps L_div above at this value
MAX_USAGE_VARIANCE = 0.25  # the largest variance of a variable in [0, 1]: L_disp's normaliser in the release
ADAPTIVE_WEIGHT_RANGE = (0.1, 0.5)  # paper Sec. 3.2: w = 0 below, 1 above, a ramp in between (Table 8 varies it)


# ---------------------------------------------------------------- flow matching

def interpolate(x, eps, t):
    """The linear path of SiT and REPA: x_t = (1 − t)·x + t·ε, and its velocity v = dx_t/dt = ε − x.

    x, eps: (N, C, H, W); t: (N,), drawn t ~ U(0, 1) in training (REPA's default). Returns x_t, v, both (N, C, H, W).
    """
    t = t.view(-1, 1, 1, 1)  # (N, 1, 1, 1)
    return (1 - t) * x + t * eps, eps - x


def flow_matching_loss(v_pred, v_target):
    """L_FM = ‖v_θ(x_t, t, y) − v‖², averaged over C, H, W (SiT / REPA). Per sample: (N,)."""
    return (v_pred.float() - v_target.float()).pow(2).mean(dim=(1, 2, 3))


# ---------------------------------------------------------------- REPA: representation alignment

def repa_loss(projections, targets):
    """L_REPA = −(1/K) Σ_k (1/T) Σ_t cos(h_φ,k(f)[n, t], z_k[n, t]) (Yu et al. 2025, REPA's `SILoss`). Per sample: (N,).

    projections: K tensors (N, T, Z_k), the projector outputs h_φ,k of the aligned block's tokens f;
    targets:     K tensors (N, T, Z_k), the frozen encoders' patch tokens z_k (DINOv2's `x_norm_patchtokens`).
    """
    if len(projections) != len(targets) or not projections:
        raise ValueError(f"REPA needs one projector per encoder: got {len(projections)} projections "
                         f"for {len(targets)} encoders")
    per_encoder = []
    for h, z in zip(projections, targets):
        if h.shape != z.shape:
            raise ValueError(f"projector output {tuple(h.shape)} does not match encoder tokens {tuple(z.shape)}")
        cos = (F.normalize(h.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(dim=-1)  # (N, T)
        per_encoder.append(-cos.mean(dim=1))                                                 # (N,)
    return torch.stack(per_encoder).mean(dim=0)  # (K, N) → (N,)


# ---------------------------------------------------------------- DiverseDiT: representation diversity loss (Sec. 3.2)

def diversity_pairs(depth, encoder_depth=None, layers=DIVERSITY_LAYERS):
    """The block pairs P on which L_orth and L_MI are computed, exactly as the authors' release builds them.

    The paper (Appendix B) "randomly selects 10 layers"; the release uses this fixed list instead: at most K = 10
    pairs (i, j), the inner index j running i+1 … L−1 and stopping at K pairs. The outer index i starts at 0
    without REPA, and at K − encoder_depth − 1 with REPA, ending at K + encoder_depth − 1 as the release's loop
    does (a bound that changes the set only for depth 13 with encoder_depth 1). Examples with REPA: encoder_depth 8
    gives block 1 against blocks 2…11; depth 12 with encoder_depth 4 gives (5, 6…11) and (6, 7…10).
    Table A7's other counts (5, 15, 20) replace 10 by K in this rule; `layers=None` ("all") takes every pair.
    Blocks are 0-indexed.
    """
    if layers is None:
        return [(i, j) for i in range(depth) for j in range(i + 1, depth)]
    max_pairs = min(layers, depth * (depth - 1) // 2)
    if encoder_depth is None:
        outer = range(depth)
    else:
        start = max_pairs - encoder_depth - 1
        if start < 0:
            raise ValueError(f"the release's pair rule starts at block {max_pairs} − encoder_depth − 1 = {start} "
                             f"for encoder_depth {encoder_depth}")
        outer = range(start, max_pairs + encoder_depth)
    pairs = list(itertools.islice(((i, j) for i in outer for j in range(i + 1, depth)), max_pairs))  # the first K
    if not pairs:
        raise ValueError(f"the release's pair rule finds no block pair for depth {depth} and encoder_depth "
                         f"{encoder_depth}")
    return pairs


def paired_blocks(pairs, num_blocks):
    """The blocks that P names, sorted. Explicit pairs are accepted anywhere; each must name two distinct
    existing blocks, i < j."""
    if not pairs:
        raise ValueError("the diversity loss needs at least one block pair")
    for i, j in pairs:
        if not 0 <= i < j < num_blocks:
            raise ValueError(f"block pair ({i}, {j}) is not 0 ≤ i < j < {num_blocks}")
    return sorted({b for pair in pairs for b in pair})


def orthogonality_loss(feats, pairs):
    """L_orth = (1/|P|) Σ_{(i,j)∈P} cos(μ_i, μ_j),  μ_l = (1/NT) Σ_{n,t} f_l[n, t, :] ∈ R^D  (paper Eqs. 9–10).

    The signed cosine, neither squared nor absolute, as in the paper and the release. Range [−1, 1].
    feats: L tensors (N, T, D); pairs: list of (i, j) block indices.
    """
    mu = {b: feats[b].float().mean(dim=(0, 1)) for b in paired_blocks(pairs, len(feats))}  # μ_l: (D,)
    return torch.stack([F.cosine_similarity(mu[i], mu[j], dim=0, eps=DIVERSITY_EPS) for i, j in pairs]).mean()


def mutual_information_loss(feats, pairs):
    """L_MI = (1/|P|) Σ_{(i,j)∈P} | (1/NT) Σ_{n,t} f̂_{i,n,t}ᵀ f̂_{j,n,t} |,  f̂_{l,n,t} = f_l[n,t,:] / ‖f_l[n,t,:]‖₂
    (paper Eqs. 11–12).

    Deviation from the printed equation: the absolute value per pair is the release's; the paper prints none.
    With it, anti-correlated blocks are penalised like correlated ones. Range [0, 1].
    """
    f_hat = {b: F.normalize(feats[b].float(), dim=-1, eps=DIVERSITY_EPS) for b in paired_blocks(pairs, len(feats))}
    # f̂_iᵀ f̂_j per token (N, T), averaged over n and t; the |·| is the release's
    return torch.stack([torch.linalg.vecdot(f_hat[i], f_hat[j]).mean().abs() for i, j in pairs]).mean()


def dispersion_loss(feats):
    """L_disp = −(1/D) Σ_k (a'_k − ā')²,  a' = a / max_k a_k,  a = (1/|P|) Σ_{l∈P} mean_{n,t} f̂̃_l
    (paper Eqs. 13–14), in the release's form.

    f̂̃_l is block l flattened to f̃_l (NT, D) and normalised along the sample axis: each feature column is
    l2-normalised over its NT rows. Deviations from the printed equations, all the release's and each marked at its
    line: the mean takes |·|, a averages over all L blocks (the paper: over P), the max gets + eps, and the
    variance is divided by 0.25 (its largest value for a' ∈ [0, 1]) and clamped to [0, 1]. Minimising L_disp
    maximises the spread of channel usage. Range [−1, 0].
    """
    # mean_{n,t} |f̂̃_l|: (D,) per block; the |·| is the release's
    usage = [F.normalize(f.float().flatten(0, 1), dim=0, eps=DIVERSITY_EPS).abs().mean(dim=0) for f in feats]
    a = torch.stack(usage).mean(dim=0)  # (L, D) → (D,): over all L blocks, the release's (the paper: over P)
    a = a / (a.max() + DIVERSITY_EPS)   # + eps: the release's
    variance = (a - a.mean()).pow(2).mean()
    return -(variance / MAX_USAGE_VARIANCE).clamp(0, 1)  # / 0.25 and the clamp: the release's


class DiversityLoss(NamedTuple):
    total: torch.Tensor               # L_div, the term that train.py weights by adaptive_weight(L_div)
    orthogonality: torch.Tensor       # L_orth
    mutual_information: torch.Tensor  # L_MI
    dispersion: torch.Tensor          # L_disp


def diversity_loss(feats, pairs, terms=DIVERSITY_TERMS):
    """L_div = λ_orth·L_orth + λ_MI·L_MI + λ_disp·L_disp with λ = 1/3 each (paper Eq. 15: "0.33"; the release
    takes the mean of the three).

    feats: the L block outputs (N, T, D), not detached; pairs: see `diversity_pairs`; terms: those of
    DIVERSITY_TERMS in the total. Returns the total and its three terms, all scalars (all three are computed, for
    the log). Tables 7, A8, A9 ("only L_orth", …) keep one term: we read them as Eq. 15 with the other λ set to 0,
    so the kept term keeps its λ = 1/3 and w is computed on that L_div (not on the term alone).
    As in the release, the total is clamped above at 5 (inert: the mean of the three terms never exceeds 2/3) and
    replaced by 0 when not finite. Unlike the release, which skips each pair
    or block holding a NaN or Inf (one host-device synchronisation per pair) and returns a constant without
    gradient, this is one `torch.where` on the total: no synchronisation, but non-finite features still send
    non-finite gradients backwards, as the flow-matching loss on the same features does anyway.
    """
    if len(feats) < 2:
        raise ValueError(f"the diversity loss compares blocks and needs at least 2, got {len(feats)}")
    if any(f.shape != feats[0].shape for f in feats):
        raise ValueError(f"block features differ in shape: {sorted({tuple(f.shape) for f in feats})}")
    feats = [f.float() for f in feats]  # once, so that the terms share the float32 copies
    if not terms or not set(terms) <= set(DIVERSITY_TERMS):
        raise ValueError(f"diversity terms {terms!r}: choose one or more of {', '.join(DIVERSITY_TERMS)}")
    orth, mi, disp = orthogonality_loss(feats, pairs), mutual_information_loss(feats, pairs), dispersion_loss(feats)
    kept = [term for name, term in zip(DIVERSITY_TERMS, (orth, mi, disp)) if name in terms]
    total = (sum(kept) / 3).clamp(max=MAX_DIVERSITY_LOSS)
    total = torch.where(torch.isfinite(total), total, 0.0)
    return DiversityLoss(total, orth, mi, disp)


def adaptive_weight(l_div, weight_range=ADAPTIVE_WEIGHT_RANGE):
    """w = 1 if L_div > 0.5;  (L_div − 0.1) / 0.5 if 0.1 < L_div ≤ 0.5;  0 otherwise  (paper Sec. 3.2).

    It keeps L_div from being optimised towards 0, where training diverges (paper Table 8). The paper does not
    say whether w is detached; the release does not detach it, and neither do we, so in the middle range the
    gradient of w·L_div is (2·L_div − 0.1) / 0.5. Table 8's other ranges [lo, hi] = [0.2, 0.7], [0.3, 0.9] are not
    printed as formulas; we read the printed one as (L_div − lo) / hi, i.e. w = 1 above hi, (L_div − lo) / hi in
    (lo, hi], 0 below: [0.1, 0.5] is exactly the printed w, and w jumps to 1 at hi as the printed one does (0.8 → 1).
    weight_range None is Table 8's constant weight, w = 1.
    """
    if weight_range is None:
        return torch.ones_like(l_div)
    low, high = weight_range
    return torch.where(l_div > high, 1.0, torch.where(l_div > low, (l_div - low) / high, 0.0))


# ---------------------------------------------------------------- DispLoss (Wang & He 2025) and SRA (Jiang et al. 2025)

def disploss(z, tau=1.0):
    """L_Disp = log( (1/N²) Σ_{i,j} exp(−‖z_i − z_j‖² / (τ·d)) ), the InfoNCE-ℓ2 form of "Diffuse and Disperse".

    z: (N, T, D), one block's output; each sample is flattened to d = T·D values and the squared distance is
    divided by d, as the PyTorch release does. The mean runs over the full N×N matrix, diagonal included, on the
    local batch. Scalar in [−log N, 0]: 0 when all samples are equal, −log N when they are far apart.
    Defaults of the PyTorch release: τ = 1, weight 0.25, applied to the last block.
    """
    n = z.shape[0]
    z = z.float().flatten(1)                      # (N, d)
    sq_dist = F.pdist(z).pow(2) / z.shape[1]      # (N(N−1)/2,): the strict upper triangle
    logits = -torch.cat([sq_dist, sq_dist, sq_dist.new_zeros(n)]) / tau  # all N² entries of the matrix
    return torch.logsumexp(logits, dim=0) - math.log(n * n)


def sra_teacher_time(t, t_max=0.2):
    """SRA's teacher time t_T = clamp(t − t_max·u, 0, 1), u ~ U(0, 1): the teacher sees a less noisy input."""
    return (t - t_max * torch.rand_like(t)).clamp(DATA_TIME, NOISE_TIME)


def sra_loss(student, teacher, beta=0.05):
    """L_SRA = smooth-L1_β(head(f_s^student), f_t^teacher), averaged over T and D (SRA's paper loss). Per sample: (N,).

    student: (N, T, D), the SRA head applied to the student's block-s output; teacher: (N, T, D), the EMA
    teacher's block-t output at the less noisy time, under stop-gradient. β = 0.05; weight 0.2 in the paper.
    This is the SRA paper's setting, which the DiverseDiT paper combines with; SRA's release has since moved to
    a cosine loss.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features differ")
    return F.smooth_l1_loss(student.float(), teacher.detach().float(), beta=beta, reduction="none").mean(dim=(1, 2))


# ---------------------------------------------------------------- MeanFlow (Geng et al. 2025): one-step generation

MEANFLOW_TIME_MEAN, MEANFLOW_TIME_STD = -0.4, 1.0  # logit-normal (t, r) draws (official configs)
MEANFLOW_R_EQUALS_T = 0.75                          # fraction of the batch with r = t (official data_proportion)
MEANFLOW_NORM_EPS = 1e-2                            # c of the adaptive weight: the official code (the paper: 1e-3)


def sample_meanflow_times(n, device=None, p_mean=MEANFLOW_TIME_MEAN, p_std=MEANFLOW_TIME_STD,
                          r_equals_t=MEANFLOW_R_EQUALS_T):
    """(t, r), each (n,): two logit-normal draws σ(N(p_mean, p_std)), t the larger and r the smaller; the first
    ⌊r_equals_t·n⌋ samples get r = t (the official code's data_proportion; the batch order is random)."""
    draws = torch.sigmoid(torch.randn(2, n, device=device) * p_std + p_mean)  # (2, n)
    t, r = draws.max(dim=0).values, draws.min(dim=0).values
    same = torch.arange(n, device=device) < int(r_equals_t * n)
    return t, torch.where(same, t, r)


def meanflow_target(u_fn, z, r, t, v):
    """u_tgt = v − clip(t − r, 0, 1)·du/dt, under stop-gradient (MeanFlow Eq. 10).

    du/dt = v·∂_z u + ∂_t u is one Jacobian-vector product of u_fn(z, r, t) at (z, r, t) with tangents (v, 0, 1).
    Fused attention kernels lack forward-mode derivatives, so the product runs with the math kernel.
    z, v: (N, C, H, W); r, t: (N,). Returns (u, u_tgt), both detached.
    """
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), torch.no_grad():
        u, du_dt = torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    h = (t - r).clamp(0, 1)[:, None, None, None]  # (N,) → (N, 1, 1, 1)
    return u.detach(), (v - h * du_dt).detach()


def meanflow_guided_velocity(u_fn, z_t, t, y, v, null_class, omega=1.0, kappa=0.0, interval=(0.0, 1.0)):
    """MeanFlow's guided target velocity (its official code's guidance in training): inside the time interval and for
    samples that kept their label, ṽ = ω·v + κ·u(z_t, t, t | y) + (1 − ω − κ)·u(z_t, t, t | ∅); elsewhere v.

    u_fn(z, t, y): the network's instantaneous velocity u(z, t, t | y); z_t, v: (N, C, H, W); t, y: (N,).
    """
    if omega == 1.0 and kappa == 0.0:
        return v
    null = torch.full_like(y, null_class)
    with torch.no_grad():  # one batched forward, conditional and unconditional
        u_cond, u_uncond = u_fn(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
    guided = omega * v + kappa * u_cond + (1 - omega - kappa) * u_uncond
    inside = (t >= interval[0]) & (t <= interval[1]) & (y != null_class)  # (N,)
    return torch.where(inside[:, None, None, None], guided, v)


def meanflow_loss(u_pred, u_target, c=MEANFLOW_NORM_EPS, p=1.0):
    """MeanFlow's adaptively weighted loss, per sample (N,): w·ℓ with ℓ = Σ_{C,H,W} (u − u_tgt)² and
    w = sg(1 / (ℓ + c)^p), p = 1 (the paper's Sec. 4.3; c = 1e-2 as the official code, see MEANFLOW_NORM_EPS)."""
    l2 = (u_pred.float() - u_target.float()).pow(2).sum(dim=(1, 2, 3))  # (N,)
    return l2 / (l2.detach() + c) ** p
