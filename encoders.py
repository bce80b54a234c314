"""REPA's target encoders: the frozen self-supervised ViTs whose patch tokens a SiT block is aligned with (REPA, and
the paper's Table A2), named as REPA's --enc-type:

    dinov2-vit-{s,b,l,g}   DINOv2 ViT/14 through torch.hub
    mae-vit-b              MAE ViT-B/16, its published mae_pretrain_vit_base.pth
    mocov3-vit-b           MoCo v3 ViT-B/16, its published vit-b-300ep.pth.tar

`load_encoder` gives one as a frozen module: uint8 images (N, 3, S, S) → patch tokens (N, T, Z), the class token
dropped, token i being patch i in row-major order, as the SiT's token i. Call it under no_grad.
"""
import math
import textwrap
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from models import Attention  # the SiT's, timm's layout (keys qkv, proj) as these ViTs
from runtime import UserError, barrier

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # every encoder here (REPA)
DINOV2_REPO = "facebookresearch/dinov2"
# (file in the weights folder, where its authors publish it): MAE's README, MoCo v3's CONFIG.md
VIT_WEIGHTS = {"mae-vit-b": ("mae_pretrain_vit_base.pth",
                             "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"),
               "mocov3-vit-b": ("vit-b-300ep.pth.tar",
                                "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar")}
VIT_B = dict(width=768, depth=12, heads=12)  # ViT-B/16 in both papers
ENCODERS = (*(f"dinov2-vit-{size}" for size in "sblg"), *VIT_WEIGHTS)


def resample_pos_embed(pos_embed, grid):
    """A ViT position embedding (1, 1 + G², D) with a class slot resampled to (1, 1 + grid², D): bicubic with
    antialiasing on the G×G grid, class slot kept (REPA resamples all three encoders' this way, with timm)."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = math.isqrt(patches.shape[1])
    patches = patches.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)           # (1, D, G, G)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)  # (1, grid², D)
    return torch.cat([cls, patches], dim=1)


def normalize(images):
    """The preprocessing all REPA's encoders here share: uint8 → /255 → ImageNet mean/std."""
    return TF.normalize(images.float() / 255, IMAGENET_MEAN, IMAGENET_STD)


class DINOv2Target(nn.Module):
    """uint8 images (N, 3, S, S) → /255 → ImageNet mean/std → bicubic resize to 224·(S/256) → the encoder's
    `forward_features(x)["x_norm_patchtokens"]` (final LayerNorm, class token dropped)."""

    def __init__(self, encoder, image_size):
        super().__init__()
        self.encoder = encoder
        self.embed_dim, self.input_size = encoder.embed_dim, 224 * (image_size // 256)

    def forward(self, images):
        x = F.interpolate(normalize(images), size=self.input_size, mode="bicubic")
        return self.encoder.forward_features(x)["x_norm_patchtokens"]


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(width, 4 * width), fc2=nn.Linear(4 * width, width)))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class ViT(nn.Module):
    """The ViT/16 of MAE and MoCo v3 (timm's VisionTransformer: pre-norm blocks, qkv bias, exact GELU, LayerNorm eps
    1e-6), its parameters named as in their published files, on REPA's input: the normalized S-px image, not resized.

    REPA's features: the patch tokens of the last block, the class token dropped; after the final LayerNorm for
    MoCo v3 (timm's forward_features), before it for MAE (REPA's mae_vit.py leaves it out).
    """

    def __init__(self, width, depth, heads, grid, final_norm):
        super().__init__()
        self.embed_dim, self.final_norm = width, final_norm
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, width, kernel_size=16, stride=16)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, images):
        x = self.patch_embed.proj(normalize(images)).flatten(2).transpose(1, 2)           # (N, T, D), row-major
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed  # (N, 1 + T, D)
        for block in self.blocks:
            x = block(x)
        return (self.norm(x) if self.final_norm else x)[:, 1:]                              # (N, T, D)


def check_encoder(name, image_size, num_tokens, weights_dir="ckpts"):
    """The patch grid (per side) of encoder `name` (one of ENCODERS) on S-px images. Every mistake the user can make
    is refused here (UserError), before anything is downloaded or read: an unknown name, an image size the encoder
    does not take, a grid that does not give the model's `num_tokens` (REPA aligns token i with patch i), a missing
    weight file."""
    if name not in ENCODERS:
        raise UserError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    dinov2 = name.startswith("dinov2")
    if dinov2 and image_size % 256:
        raise UserError(f"REPA's DINOv2 target needs images of 256 or 512 px (224·S/256 pixels, 16·S/256 patches "
                        f"per side), got {image_size}")
    if not dinov2 and image_size != 256:  # as REPA's load_encoders, which takes only DINOv2 to 512 px
        raise UserError(f"REPA's {name} target needs images of 256 px (16×16 patches of 16 px), got {image_size}")
    grid, label = 16 * (image_size // 256), "DINOv2" if dinov2 else name
    if num_tokens != grid * grid:
        raise UserError(f"REPA aligns token i with {label} patch i, but the model has {num_tokens} tokens and "
                        f"{label} {grid * grid} at {image_size} px: use patch size 2")
    if not dinov2 and not (Path(weights_dir) / VIT_WEIGHTS[name][0]).is_file():
        file, url = VIT_WEIGHTS[name]
        raise UserError(f"{name} needs its published weights {Path(weights_dir) / file}: download {url} into "
                        f"{weights_dir} (--encoder-dir sets the folder)")
    return grid


def load_encoder(name, image_size, num_tokens, weights_dir="ckpts"):
    """REPA's target encoder `name` for S-px images (checked by `check_encoder`), frozen and in eval mode, with
    `embed_dim`."""
    grid, dinov2 = check_encoder(name, image_size, num_tokens, weights_dir), name.startswith("dinov2")
    encoder = load_dinov2(name[-1], image_size, grid) if dinov2 else load_vit(name, weights_dir, grid)
    return encoder.eval().requires_grad_(False)


def load_encoders(names, image_size, num_tokens, weights_dir="ckpts"):
    """`load_encoder` for each name of a list, each distinct encoder loaded once (several blocks may share one)."""
    loaded = {name: load_encoder(name, image_size, num_tokens, weights_dir) for name in dict.fromkeys(names)}
    return [loaded[name] for name in names]


def load_dinov2(size, image_size, grid):
    """DINOv2-{size}/14 from torch.hub, its position embedding resampled to the grid×grid patches of a 224·S/256 px
    image (REPA). Rank 0 loads first (filling the hub cache)."""
    model = f"dinov2_vit{size}14"
    try:
        if dist.is_initialized() and dist.get_rank() != 0:
            barrier()  # rank 0 fills the cache first
        encoder = torch.hub.load(DINOV2_REPO, model, trust_repo=True)
    except Exception as e:  # no network, no cached copy, GitHub rate limits…
        raise UserError(f"could not load {model} through torch.hub ({e}). Run once where GitHub is reachable "
                        f"to fill the hub cache ({torch.hub.get_dir()}), then train with the same TORCH_HOME."
                        ) from None
    finally:
        if dist.is_initialized() and dist.get_rank() == 0:
            barrier()
    encoder.pos_embed.data = resample_pos_embed(encoder.pos_embed.data, grid)
    encoder.head = nn.Identity()
    return DINOv2Target(encoder, image_size)


def load_vit(name, weights_dir, grid):
    """MAE's or MoCo v3's ViT-B/16 from its published file in `weights_dir`, every parameter loaded (strict), its
    224-px position embedding resampled to the grid×grid patches of a 256-px image (as REPA: MoCo v3's fixed sin-cos
    table too, not recomputed). Deviations from REPA's load_encoders: the files keep their published names (REPA
    reads renamed copies, ckpts/mae_vit{b}.pth, ckpts/mocov3_vit{b}.pth); MAE's ViT-B (REPA builds ViT-L for any
    mae-vit-*)."""
    path = Path(weights_dir) / VIT_WEIGHTS[name][0]
    model = ViT(**VIT_B, grid=grid, final_norm=name.startswith("mocov3"))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if name.startswith("mae"):
            state = checkpoint["model"]  # the encoder alone
        else:  # the DDP-wrapped MoCo module: its base (query) encoder, without the projection MLP `head`
            prefix = "module.base_encoder."
            state = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items()
                     if k.startswith(prefix) and not k.startswith(prefix + "head.")}
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], grid)
        model.load_state_dict(state)
    except Exception as e:  # not a checkpoint, another layout, missing / unexpected / misshapen parameters
        raise UserError(f"{path} is not {path.name} as its authors publish it ({type(e).__name__}: "
                        f"{textwrap.shorten(str(e), 240)})") from None
    return model
