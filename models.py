"""SiT with DiverseDiT's long residual connections, REPA projector heads and an SRA head.

The backbone is the SiT of Ma et al. (2024), itself DiT's transformer (Peebles & Xie, 2023). With the paper's
additions switched off, the state-dict keys and shapes equal the official ones, so that willisma/SiT's
`SiT-XL-2-256.pt` (`learn_sigma=True`) and sihyun-yu/REPA's `last.pt` (`z_dims=[768]`) load with `strict=True`.

Shape legend, used in every comment of this file: N batch, T tokens (= H·W / p²), D width (hidden size),
C channels, H, W latent height and width, p patch size, L blocks (depth), Z width of an encoder's features (REPA).

Time convention: REPA's. t = 0 is data and t = 1 is noise, x_t = (1 − t)·x + t·ε, and the network predicts
v = ε − x (see losses.py). Official SiT checkpoints use the reverse; `sit_time=True` converts them.
"""
import math
from collections import OrderedDict
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def modulate(x, shift, scale):
    # x: (N, T, D); shift, scale: (N, D), broadcast over tokens.
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def mlp(*widths):
    """Linear – SiLU – … – Linear through the given widths (the timestep MLP, REPA's projector, SRA's head)."""
    layers = [layer for d_in, d_out in zip(widths, widths[1:]) for layer in (nn.Linear(d_in, d_out), nn.SiLU())]
    return nn.Sequential(*layers[:-1])


# ---------------------------------------------------------------- embedding layers for patches, time and labels

class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches to D-dimensional tokens: one strided convolution."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, H/p, W/p) → (N, T, D), tokens in row-major order


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by a two-layer MLP (DiT's, with t in [0, 1] unscaled as SiT/REPA)."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = mlp(frequency_embedding_size, hidden_size, hidden_size)
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """[cos(t·ω_k) | sin(t·ω_k)] with ω_k = max_period^(−k / (dim/2)), k = 0 … dim/2 − 1."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]                      # (N, dim/2)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # Cast to the MLP's dtype so a low-precision model (no autocast) accepts fp32 features.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))        # (N, D)


class LabelEmbedder(nn.Module):
    """Class embedding table; row `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        # As in DiT: the extra null row exists only when labels are dropped in training.
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def drop(self, y):
        """In training, each label replaced by the null class with probability `dropout_prob` (DiT/SiT/REPA: 0.1)."""
        if self.training and self.dropout_prob > 0:
            y = torch.where(torch.rand(y.shape[0], device=y.device) < self.dropout_prob, self.num_classes, y)
        return y

    def forward(self, y):
        return self.embedding_table(y)  # (N, D)


# ---------------------------------------------------------------- core SiT model

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's layout: keys `qkv`, `proj`)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads)  # (N, T, 3, heads, D/heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                           # 3 × (N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)                              # (N, heads, T, D/heads)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))                     # (N, T, D)


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: c gives shift, scale and a gate for each residual branch."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        width = int(hidden_size * mlp_ratio)  # timm's Mlp layout (keys `fc1`, `fc2`), with tanh-approximated GELU
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(hidden_size, width), act=nn.GELU(approximate="tanh"),
                                             fc2=nn.Linear(width, hidden_size)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        # x: (N, T, D); c: (N, D). Six (N, D) modulation vectors.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from each token to its p×p×C patch."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 × (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p·p·C)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 and returned in the input's dtype (the authors' release does the same)."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class SiT(nn.Module):
    """SiT with DiverseDiT's long residual connections, REPA projectors and an SRA head, each optional.

    Long residual connections (paper Sec. 3.1, Eq. 8): f_l = Linear(Norm(f_i ⊕ f_{l−1})). As in the authors'
    release, with 0-indexed blocks, after block j for j = ⌊L/2⌋ … L−1 the hidden state becomes
    Linear_k(LayerNorm_k([x ‖ out_{L−1−j}])) with k = j − ⌊L/2⌋: the deepest block is fused with block 0's
    output and feeds the final layer. The fused tensor replaces x; there is no extra additive residual.
    """

    def __init__(
        self,
        input_size=32,            # latent height and width (32 for 256 px images through the SD-VAE)
        patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,  # SiT-XL/2
        class_dropout_prob=0.1,   # DiT/SiT/REPA label dropout for classifier-free guidance
        num_classes=1000,
        learn_sigma=False,        # True for official SiT/DiT checkpoints: 2·C outputs, the second C discarded
        sit_time=False,           # weights trained in SiT's time convention (t = 1 data); see forward()
        long_residual=False,      # DiverseDiT's long residual connections (paper Sec. 3.1)
        z_dims=(),                # REPA: one projector per alignment, with its target encoder's width
        encoder_depth=None,       # REPA: the block (1-indexed) all projectors read, or one block per projector;
                                  # the paper uses 5 for B and 8 for L and XL (its Table A1), REPA 4 for B, 8 for XL
        projector_dim=2048,       # REPA: hidden width of the projector MLP
        sra_depth=None,           # SRA: the student block (1-indexed) whose output goes through the SRA head
        meanflow=False,           # MeanFlow: a second time embedder for h = t − r; forward then takes r
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        if long_residual and depth % 2:
            raise ValueError(f"long residual connections pair block i with L−1−i and need an even depth, got {depth}")
        encoder_depths = [encoder_depth] * len(z_dims) if isinstance(encoder_depth, int) else list(encoder_depth or ())
        if len(encoder_depths) != len(z_dims) or not all(1 <= d <= depth for d in encoder_depths):
            raise ValueError(f"REPA projectors need an encoder_depth in 1..{depth} (the paper uses 5 for B, 8 for L "
                             f"and XL), or one per projector; got {encoder_depth} for {len(z_dims)} projectors")
        if sra_depth is not None and not 1 <= sra_depth <= depth:
            raise ValueError(f"SRA student depth must be in 1..{depth}, got {sra_depth}")
        self.input_size, self.in_channels, self.patch_size, self.depth = input_size, in_channels, patch_size, depth
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes  # also the index of the null class
        self.sit_time, self.long_residual, self.meanflow = sit_time, long_residual, meanflow
        self.encoder_depths, self.sra_depth = encoder_depths, sra_depth
        if long_residual:
            # Built first, as in the authors' release, so that a given seed draws the release's initial weights
            # (without them, the official SiT / REPA ones). Each Linear(2D → D) sits in a Sequential only for the
            # release's keys, `skip_linears.k.linear.*`, so that its checkpoints load unchanged.
            self.skip_linears = nn.ModuleList(
                [nn.Sequential(OrderedDict(linear=nn.Linear(2 * hidden_size, hidden_size))) for _ in range(depth // 2)])
            self.skip_norms = nn.ModuleList([LayerNorm32(2 * hidden_size, eps=1e-6) for _ in range(depth // 2)])
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if meanflow:  # MeanFlow's design: c = emb_t(t) + emb_h(t − r) + emb_y(y)
            self.h_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A frozen parameter, not a buffer, so that the key is in the official state dicts.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.projectors = nn.ModuleList([mlp(hidden_size, projector_dim, projector_dim, z) for z in z_dims])
        if sra_depth is not None:
            self.sra_head = mlp(hidden_size, 2 * hidden_size, hidden_size)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # Every Linear (fusions and heads included, as in the authors' release): xavier-uniform, zero bias.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size))
        # The patch embedding is initialised like a Linear on its flattened (D, C·p·p) weight.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in (self.t_embedder, self.h_embedder) if self.meanflow else (self.t_embedder,):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the network outputs exactly 0.
        zeroed = [block.adaLN_modulation[-1] for block in self.blocks]
        for layer in zeroed + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        # x: (N, T, p·p·C) → (N, C, H, W)
        p, c, h = self.patch_size, self.out_channels, self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)       # (N, H/p, W/p, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)          # (N, C, H/p, p, W/p, p)
        return x.reshape(x.shape[0], c, h * p, h * p)  # (N, C, H, W)

    def forward(self, x, t, y, return_features=False, r=None, drop_labels=True):
        """Velocity v(x_t, t | y) in this project's time convention: x (N, C, H, W) noisy latents, t (N,) times in
        [0, 1], y (N,) class labels (`num_classes` = null) → v (N, C, H, W), or (v, Features) with `return_features`
        (without it, no feature is computed or kept). With `sit_time`, the weights expect SiT's convention (t = 1
        data, v = x − ε) and this returns v(x, t) = −v_sit(x, 1 − t), the same velocity field in ours.
        MeanFlow models (`meanflow=True`) predict the average velocity u(x, r, t) from r to t and need r: (N,).
        `drop_labels=False` skips label dropout, for callers that dropped labels themselves (MeanFlow's loss runs
        the network twice on the same labels)."""
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"expected input of shape (N, {self.in_channels}, {self.input_size}, "
                             f"{self.input_size}), got {tuple(x.shape)}")
        if (r is not None) != self.meanflow:
            raise ValueError("a MeanFlow model takes r, and only a MeanFlow model does")
        t = 1 - t if self.sit_time else t
        y = self.y_embedder.drop(y) if drop_labels else y  # label dropout for classifier-free guidance (training)
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        if self.meanflow:
            c = c + self.h_embedder(t - r)
        skips, blocks = [], []
        for i, block in enumerate(self.blocks):
            x = block(x, c)  # (N, T, D)
            if self.long_residual and i >= self.depth // 2:
                # Long residual: fuse with the output of block L−1−i (LIFO over the shallow half).
                k = i - self.depth // 2
                x = self.skip_linears[k](self.skip_norms[k](torch.cat([x, skips.pop()], dim=-1)))  # (N, T, D)
            elif self.long_residual:
                skips.append(x)
            if return_features:
                blocks.append(x)
        if return_features:  # each (N, T, Z): projector k on its block's output; SRA's head: (N, T, D)
            repa = [projector(blocks[d - 1]) for projector, d in zip(self.projectors, self.encoder_depths)]
            sra = self.sra_head(blocks[self.sra_depth - 1]) if self.sra_depth else None
        # (N, out_channels, H, W), cut to (N, C, H, W): learn_sigma's variance channels are dropped, as SiT does
        x = self.unpatchify(self.final_layer(x, c))[:, :self.in_channels]
        x = -x if self.sit_time else x
        return (x, Features(blocks, repa, sra, y)) if return_features else x

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance on all channels: v = v(∅) + s·(v(y) − v(∅)), from one batched forward (only
        the conditional one at s = 1). Combined in float32 even under bf16 autocast, where v(y) − v(∅) would lose
        most of its digits. Where along the trajectory to guide (REPA's interval) is `sample.guidance_at`'s choice."""
        if cfg_scale == 1.0:
            return self(x, t, y).float()
        if self.y_embedder.embedding_table.num_embeddings == self.num_classes:
            raise ValueError("this model has no null class (class_dropout_prob=0), so it cannot be guided")
        y_null = torch.full_like(y, self.num_classes)  # conditional on top, unconditional below: 2 × (N, C, H, W)
        v_cond, v_uncond = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).float().chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)


class Features(NamedTuple):
    """What `SiT.forward(..., return_features=True)` returns beside the velocity."""
    blocks: list            # L × (N, T, D): each block's output, after its long-residual fusion if any; not detached
    repa: list              # one (N, T, Z) per REPA projector; empty without projectors
    sra: Optional[Tensor]   # (N, T, D): the SRA head on block `sra_depth`'s output, or None
    labels: Tensor          # (N,): the labels the network saw, after label dropout (SRA's teacher sees the same)


def get_2d_sincos_pos_embed(dim, grid_size):
    """MAE's fixed 2-D sin-cos embedding of row-major tokens, (1, T, dim) in float32 (computed in float64):
    [sin(col·ω_k) | cos(col·ω_k) | sin(row·ω_k) | cos(row·ω_k)], ω_k = 10000^(−k / (dim/4)) (MAE's column first)."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = coords.repeat_interleave(grid_size), coords.repeat(grid_size)  # (T,) each
    angles = [pos[:, None] * omega[None] for pos in (cols, rows)]               # 2 × (T, dim/4)
    emb = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)  # (T, dim)
    return emb.float().unsqueeze(0)


# ---------------------------------------------------------------- SiT configs

# Size: (depth L, width D, heads), as in DiT/SiT Table 1. "Tiny" is ours, for CPU smoke runs and tests.
SIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16), "Tiny": (8, 128, 4)}
SiT_models = {f"SiT-{size}/{p}": partial(SiT, depth=depth, hidden_size=width, num_heads=heads, patch_size=p)
              for size, (depth, width, heads) in SIT_SIZES.items() for p in (2, 4, 8)}
TRAINING_HEADS = ("projectors.", "sra_head.")  # REPA's projectors and SRA's head: unused when sampling


def build_model(name, **kwargs):
    """Instantiate a registry entry by its paper name, e.g. build_model("SiT-XL/2", long_residual=True)."""
    if name not in SiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(SiT_models)}")
    return SiT_models[name](**kwargs)


def config_from_state_dict(state_dict):
    """(registry name, build_model keyword arguments) of the SiT network whose weights `state_dict` holds:
    everything but the training-only heads (TRAINING_HEADS) is read off the keys and shapes; the time convention
    is not in the weights at all. The embedding table is assumed to hold the null class, as every DiT / SiT / REPA
    checkpoint does. Raises a ValueError that says what the dict holds when it is not a SiT."""
    needed = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    missing = [key for key in needed if key not in state_dict]
    if missing:
        shown = ", ".join(list(state_dict)[:6]) + (", …" if len(state_dict) > 6 else "")
        raise ValueError(f"not a SiT state dict: no {', '.join(missing)} among its {len(state_dict)} keys ({shown})")
    D, C, p, _ = state_dict["x_embedder.proj.weight"].shape
    blocks = {int(key.split(".")[1]) for key in state_dict if key.startswith("blocks.")}
    if not blocks:
        raise ValueError("not a SiT state dict: it has no transformer blocks (blocks.*)")
    depth = 1 + max(blocks)
    size = next((s for s, (d, width, _) in SIT_SIZES.items() if (d, width) == (depth, D)), None)
    if size is None:
        raise ValueError(f"a SiT of depth {depth} and width {D} matches no registered size ({', '.join(SIT_SIZES)})")
    grid = math.isqrt(state_dict["pos_embed"].shape[1])  # tokens per side
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (p * p)
    if out_channels not in (C, 2 * C):
        raise ValueError(f"the final layer predicts {out_channels} channels for {C} input channels (expected {C}, "
                         f"or {2 * C} with learn_sigma)")
    return f"SiT-{size}/{p}", dict(
        input_size=grid * p, in_channels=C, num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_channels == 2 * C, long_residual="skip_linears.0.linear.weight" in state_dict,
        meanflow="h_embedder.mlp.0.weight" in state_dict)
