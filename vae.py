"""The Stable Diffusion VAE that SiT, REPA and DiverseDiT train in, self-contained: the AutoencoderKL of
`stabilityai/sd-vae-ft-ema` and `stabilityai/sd-vae-ft-mse` (one encoder, two fine-tuned decoders), with diffusers'
module names so that the public `diffusion_pytorch_model.safetensors` / `.bin` files load with strict key checking:

    image (N, 3, H, W) in [-1, 1] --encoder--> quant_conv --> (mean, logvar) of (N, 4, H/8, W/8)
    latent (N, 4, H/8, W/8)       --post_quant_conv--> decoder --> image (N, 3, H, W)

With internet access, `python -c "import vae; vae.load_vae('mse')"` fetches the weights into torch's hub cache.
"""
import hashlib
import json
import math
import sys
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import UserError, replace_atomically

LATENT_SCALE = 0.18215  # SD-VAE latent scale (LDM); latents = sample · LATENT_SCALE, no shift
LATENT_CHANNELS = 4     # the SD-VAE's latent channels
DOWNSAMPLING = 8        # latents have 1/8 of the image resolution
BLOCK_CHANNELS = (128, 256, 512, 512)  # the SD-VAE's widths, from full resolution down
LAYERS_PER_BLOCK = 2


# ---------------------------------------------------------------- the network
def group_norm(channels):  # the SD-VAE's normalisation
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x)))))), with a 1×1 convolution on the skip when the width changes."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        # .contiguous(): the memory layout diffusers gives this convolution, hence its kernels and its exact bits
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x.contiguous())
        return skip + h


class Resample(nn.Module):
    """Down: a stride-2 3×3 convolution after zero padding on the right and bottom only (the SD-VAE's asymmetric
    pad). Up: nearest-neighbour ×2, then a 3×3 convolution."""

    def __init__(self, channels, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if down else nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """Single-head self-attention over all T = H·W positions, with a residual connection."""

    def __init__(self, channels):
        super().__init__()
        self.group_norm = group_norm(channels)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key `to_out.0`, as diffusers

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)                      # (N, T, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (N, 1, T, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)                  # (N, T, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(N, C, H, W)            # a channels-last view
        return h + x  # in this order the sum stays channels-last, as in diffusers: same kernels, same bits


class MidBlock(nn.Module):
    """resnet → attention → resnet, at the lowest resolution."""

    def __init__(self, channels):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


def stages(widths, num_layers, down):
    """The encoder's down_blocks or the decoder's up_blocks: per width, `num_layers` resnets, then a resampler to
    the next resolution (none after the last), under diffusers' keys `resnets` and `downsamplers` / `upsamplers`."""
    blocks = []
    for i, width in enumerate(widths):
        resnets = [ResnetBlock(widths[max(i - 1, 0)] if j == 0 else width, width) for j in range(num_layers)]
        resample = [Resample(width, down)] if i < len(widths) - 1 else []
        block = {"resnets": nn.Sequential(*resnets), "downsamplers" if down else "upsamplers": nn.Sequential(*resample)}
        blocks.append(nn.Sequential(OrderedDict(block)))
    return nn.Sequential(*blocks)


class AutoencoderKL(nn.Module):
    """The SD-VAE: 83,653,863 parameters, state-dict keys as diffusers' AutoencoderKL."""

    def __init__(self):
        super().__init__()
        low, high = BLOCK_CHANNELS[-1], BLOCK_CHANNELS[0]  # the widths at the lowest and the full resolution
        # (N, 3, H, W) image → (N, 2·LATENT_CHANNELS, H/8, W/8): the posterior's mean and log-variance
        self.encoder = nn.Sequential(OrderedDict(
            conv_in=nn.Conv2d(3, high, 3, padding=1), down_blocks=stages(BLOCK_CHANNELS, LAYERS_PER_BLOCK, down=True),
            mid_block=MidBlock(low), conv_norm_out=group_norm(low), conv_act=nn.SiLU(),
            conv_out=nn.Conv2d(low, 2 * LATENT_CHANNELS, 3, padding=1)))
        # (N, LATENT_CHANNELS, h, w) latent → (N, 3, 8h, 8w) image, with one more resnet per stage than the encoder
        self.decoder = nn.Sequential(OrderedDict(
            conv_in=nn.Conv2d(LATENT_CHANNELS, low, 3, padding=1), mid_block=MidBlock(low),
            up_blocks=stages(BLOCK_CHANNELS[::-1], LAYERS_PER_BLOCK + 1, down=False),
            conv_norm_out=group_norm(high), conv_act=nn.SiLU(), conv_out=nn.Conv2d(high, 3, 3, padding=1)))
        self.quant_conv = nn.Conv2d(2 * LATENT_CHANNELS, 2 * LATENT_CHANNELS, 1)
        self.post_quant_conv = nn.Conv2d(LATENT_CHANNELS, LATENT_CHANNELS, 1)

    def encode(self, x):
        """Image in [-1, 1] → the diagonal Gaussian posterior's (mean, std), each (N, 4, H/8, W/8), unscaled."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # logvar clamped as LDM's DiagonalGaussianDistribution

    def decode(self, z):
        """Unscaled latent (N, 4, h, w) → image (N, 3, 8h, 8w), nominally in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))


# ---------------------------------------------------------------- weights
VAE_URLS = {name: f"https://huggingface.co/stabilityai/sd-vae-ft-{name}/resolve/main/diffusion_pytorch_model"
                  ".safetensors" for name in ("ema", "mse")}  # the public weights, fetched on first use
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # looked for in a folder
OLD_ATTENTION_KEYS = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # see load_vae
SAFETENSORS_DTYPES = dict(F64=torch.float64, F32=torch.float32, F16=torch.float16, BF16=torch.bfloat16, I64=torch.int64,
                          I32=torch.int32, I16=torch.int16, I8=torch.int8, U8=torch.uint8, BOOL=torch.bool)


def read_safetensors(path):
    """{name: tensor} of a `.safetensors` file, read without the safetensors package. The format, little-endian: a u64
    header length n, n bytes of JSON mapping each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
    (into the bytes after the header; an optional "__metadata__" entry holds strings), then the raw tensor bytes."""
    if sys.byteorder != "little":
        raise RuntimeError("reading .safetensors assumes a little-endian machine")
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")  # a file shorter than 8 bytes fails the check below too
    try:
        if not 0 < n <= len(data) - 8:
            raise ValueError(f"header length {n} does not fit in a file of {len(data)} bytes")
        header = json.loads(data[8:8 + n])
        if not isinstance(header, dict) or not all(
                isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= entry.keys()
                for name, entry in header.items() if name != "__metadata__"):
            raise ValueError("the header is not a map of tensor names to {dtype, shape, data_offsets}")
    except ValueError as e:  # a bad length, bad UTF-8, bad JSON or a header of another layout
        raise UserError(f"{path} is not a .safetensors file: {e}") from None
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, entry in header.items():
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']!r}")
        dtype, shape, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        numel = math.prod(shape)
        if not 0 <= begin <= end <= len(body) or end - begin != numel * dtype.itemsize:
            raise UserError(f"{path}: tensor {name!r} has data offsets {[begin, end]} that do not match its "
                            f"shape {shape} and dtype {entry['dtype']} in a data section of {len(body)} bytes")
        # A copy into a bytearray: a writable buffer, so the tensor owns its (aligned) memory.
        flat = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(shape)
    return tensors


def vae_weights_path(source):
    """The weight file for `source`: "ema" / "mse" (downloaded into torch's hub cache once), a file or a folder."""
    if source in VAE_URLS:
        path = Path(torch.hub.get_dir()) / "checkpoints" / f"sd-vae-ft-{source}" / WEIGHT_FILES[0]
        if path.is_file():
            return path
        created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with replace_atomically(path) as tmp:  # a download cut short leaves no file that looks complete
                torch.hub.download_url_to_file(VAE_URLS[source], str(tmp), progress=True)
        except BaseException as e:
            for folder in created:  # nothing is left behind in the cache, not even an empty folder
                folder.rmdir()
            if not isinstance(e, OSError):  # urllib's URLError included
                raise
            raise UserError(f"could not download the SD-VAE weights from {VAE_URLS[source]} ({e}); download it "
                            f"elsewhere and pass it (or its folder) as --vae PATH") from None
        return path
    path = Path(source)
    if path.is_dir():
        for name in WEIGHT_FILES + tuple(f"vae/{name}" for name in WEIGHT_FILES):  # a VAE or a pipeline folder
            if (path / name).is_file():
                return path / name
        raise UserError(f"no {' or '.join(WEIGHT_FILES)} in {path} (nor in {path / 'vae'})")
    if not path.is_file():
        raise UserError(f"--vae {source!r} is neither 'ema', 'mse', nor an existing file or folder")
    return path


def load_vae(source="mse", device="cpu"):
    """The SD-VAE with the weights of `source` ("ema", "mse", a weight file or its folder), frozen, in eval mode. A
    missing file or another layout (but the older attention names) is an error, never random weights."""
    path = vae_weights_path(source)
    if path.suffix == ".safetensors":
        state_dict = read_safetensors(path)
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # torch's message would not name the file, and may suggest the unsafe weights_only=False
            raise UserError(f"{path} is not SD-VAE weights: expected a .safetensors file or a torch file of "
                            f"tensors (diffusion_pytorch_model.bin)") from None
    # Older uploads name each mid block's attention projections as diffusers' deprecated AttentionBlock did.
    for old, new in OLD_ATTENTION_KEYS.items():
        state_dict = {k.replace(f".attentions.0.{old}.", f".attentions.0.{new}."): v for k, v in state_dict.items()}
    vae = AutoencoderKL()
    try:
        vae.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # other keys or shapes; torch's lines joined into one
        raise UserError(f"{path} is not an SD-VAE (AutoencoderKL) state dict: {' '.join(str(e).split())}") from None
    return vae.eval().requires_grad_(False).to(device)


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@torch.no_grad()
def in_chunks(vae, f, x, chunk_size, bf16):
    """f(chunk) in float32 for each chunk of `x` moved to the VAE's device as float32, under bf16 autocast if `bf16`."""
    device = next(vae.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return torch.cat([f(chunk.to(device, torch.float32)).float() for chunk in x.split(chunk_size)])


def encode_images(vae, images, chunk_size=64, bf16=False):
    """uint8 images (N, 3, H, W), [0, 255] mapped to [-1, 1], → posterior moments (N, 8, H/8, W/8) float32: mean and
    std concatenated, as a prepared dataset stores them (REPA's practice), for `sample_latents` to draw from."""
    return in_chunks(vae, lambda x: torch.cat(vae.encode(x / 127.5 - 1.0), dim=1), images, chunk_size, bf16)


def sample_latents(moments):
    """z = (mean + std·ε)·LATENT_SCALE, ε ~ N(0, I): a fresh posterior sample (N, 4, h, w) from (N, 8, h, w)."""
    mean, std = moments.chunk(2, dim=1)
    return (mean + std * torch.randn_like(mean)) * LATENT_SCALE


def decode_latents(vae, latents, chunk_size=64, bf16=False):
    """Scaled latents (N, 4, h, w) → float32 images (N, 3, 8h, 8w), nominally in [-1, 1] (not clamped)."""
    return in_chunks(vae, lambda z: vae.decode(z / LATENT_SCALE), latents, chunk_size, bf16)

