"""Sampling: ODE and SDE samplers with classifier-free guidance; PNG grids and ADM-style FID batches.

    python sample.py --ckpt CKPT --cfg-scale 4.0                       # a PNG grid: 8 classes × 4 images
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --num-fid-samples 50000 \\
        --sampler sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7   # PNGs, then one .npz (arr_0)

CKPT is a training checkpoint of this project (EMA weights unless --weights model), the official SiT-XL/2
file, or REPA's last.pt. Every setting is printed and saved beside the outputs (`<name>.json`); an interrupted run,
started again with the same command, continues and ends with the same files.
Time convention (REPA's): samplers integrate from t = 1 (noise) to t = 0 (data).
"""
import argparse
import itertools
import json
import re
import zipfile
from pathlib import Path

# Steps per sampler: REPA's ODE default; the papers' SDE FID setting; MeanFlow's one step.
DEFAULT_STEPS = {"euler": 50, "heun": 50, "sde": 250, "meanflow": 1}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a training checkpoint, SiT-XL-2-256.pt, or REPA's last.pt")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema", help="the set of a training checkpoint")
    parser.add_argument("--model", default=None, help="expected model (e.g. SiT-XL/2); read from the weights anyway")
    parser.add_argument("--sampler", choices=list(DEFAULT_STEPS), default="euler",
                        help="euler / heun (ODE), sde (Euler–Maruyama, the papers' FIDs), meanflow (MeanFlow models)")
    parser.add_argument("--num-steps", type=int, default=None, help=f"default: {DEFAULT_STEPS}")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="1 = no guidance (the paper's Tables 1, 4, 6–9)")
    parser.add_argument("--guidance-low", type=float, default=0.0, help="guide only where low ≤ t ≤ high (REPA)")
    parser.add_argument("--guidance-high", type=float, default=1.0)
    parser.add_argument("--num-fid-samples", type=int, default=None, help="this many PNGs and an .npz; else a grid")
    parser.add_argument("--class-labels", type=int, nargs="+", default=None, help="grid classes")
    parser.add_argument("--images-per-class", type=int, default=4, help="grid columns")
    parser.add_argument("--per-proc-batch-size", type=int, default=32)  # REPA generate.py's default
    parser.add_argument("--seed", type=int, default=0, help="sample i draws from a generator seeded with (seed, i)")
    parser.add_argument("--vae", default="ema", help="decoder: 'ema' or 'mse' (SiT / REPA sample with ema), or a path")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16 autocast for the network and the decoder: faster, changes FID slightly")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on GPUs")
    parser.add_argument("--sample-dir", default="samples")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad flags answer here, before the heavy imports below

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid
from tqdm import tqdm

from runtime import UserError, barrier, close_distributed, git_commit, init_distributed, replace_atomically, run
from data import BUILTIN_DATA, shapes_classifier
from models import TRAINING_HEADS, build_model, config_from_state_dict
from vae import LATENT_CHANNELS, decode_latents, file_sha256, load_vae, vae_weights_path

SDE_LAST_TIME = 0.04  # REPA: Euler–Maruyama down to t = 0.04, then one deterministic step to 0
GRID_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py grid (ImageNet classes)


def grid_labels(num_classes, classes=None, per_class=4):
    """(len(classes)·per_class,) labels, a class per grid row; default: DiT's grid classes on ImageNet, else 0–7."""
    classes = classes or (GRID_CLASSES if num_classes == 1000 else [*range(min(8, num_classes))])
    return torch.tensor([c for c in classes for _ in range(per_class)])


def guidance_at(t, cfg_scale, interval):
    """The guidance scale of a step starting at t: cfg_scale inside [low, high], else 1. REPA guides only when
    cfg_scale > 1, here any scale ≠ 1 does (they agree on the papers' scales). Tables 2–3 use "the same guidance
    interval as REPA" without giving it: the default is all of [0, 1] (REPA's README command uses high = 0.7)."""
    low, high = interval
    return cfg_scale if low <= t <= high else 1.0


def velocity(model, x, t, y, cfg_scale):
    """v(x, t | y) as float64, guided with cfg_scale on all channels. x: (N, C, H, W) float64; t: a scalar.
    The network runs in float32 (or the caller's autocast), the sampler accumulates in float64 (REPA)."""
    t_batch = torch.full((len(x),), float(t), device=x.device)  # (N,)
    return model.forward_with_cfg(x.float(), t_batch, y, cfg_scale).double()


@torch.no_grad()
def euler_sampler(model, z, y, num_steps=50, cfg_scale=1.0, interval=(0.0, 1.0), heun=False):
    """The probability-flow ODE dx/dt = v(x, t | y), integrated from x = z at t = 1 to t = 0 on a uniform grid:

    Euler:  x_{k+1} = x_k + (t_{k+1} − t_k)·v(x_k, t_k);
    Heun:   x_{k+1} = x_k + (t_{k+1} − t_k)·(v(x_k, t_k) + v(x̃_{k+1}, t_{k+1}))/2, x̃_{k+1} the Euler step; the last
            step stays Euler (as REPA and EDM; it would evaluate the network at t = 0).
    Guidance is decided once per step, at its start time (as REPA), so both slopes of a Heun step share one field."""
    t_steps = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    x = z.double()
    for k, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        scale = guidance_at(t_cur, cfg_scale, interval)
        v = velocity(model, x, t_cur, y, scale)
        if heun and k < num_steps - 1:  # the mean of the slopes at x_k and at the Euler step x̃_{k+1}
            v = 0.5 * v + 0.5 * velocity(model, x + (t_next - t_cur) * v, t_next, y, scale)
        x = x + (t_next - t_cur) * v
    return x.float()


@torch.no_grad()
def euler_maruyama_sampler(model, z, y, num_steps=250, cfg_scale=1.0, interval=(0.0, 1.0), noise=torch.randn_like):
    """REPA's SDE sampler: reverse-time Euler–Maruyama with diffusion coefficient w(t) = 2t (SiT's "sigma" form):

        x_{k+1} = x_k + [v − ½·w(t_k)·s(x_k, t_k)]·(t_{k+1} − t_k) + √w(t_k) · √|t_{k+1} − t_k| · ε_k,

    v = v(x_k, t_k | y) and s the linear path's score, s = −((1 − t)·v + x)/t (from x_t = x_0 + t·v: E[ε | x_t] = x_t +
    (1 − t)·v, and s = −E[ε | x_t]/t), on t = linspace(1, 0.04, num_steps), then one step from 0.04 to 0 with the drift
    alone (the transition's mean): num_steps network evaluations. `noise(x)` draws each ε_k, shaped like x."""
    t_steps = torch.cat([torch.linspace(1.0, SDE_LAST_TIME, num_steps, dtype=torch.float64),
                         torch.zeros(1, dtype=torch.float64)])
    x = z.double()
    for k, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        dt = t_next - t_cur  # < 0
        w = 2 * t_cur
        v = velocity(model, x, t_cur, y, guidance_at(t_cur, cfg_scale, interval))
        score = -((1 - t_cur) * v + x) / t_cur
        x = x + (v - 0.5 * w * score) * dt
        if k < num_steps - 1:  # the last step, to t = 0, is the mean: no noise
            x = x + torch.sqrt(w) * (noise(x) * torch.sqrt(dt.abs()))
    return x.float()


@torch.no_grad()
def meanflow_sampler(model, z, y, num_steps=1):
    """MeanFlow's sampler: z_r = z_t − (t − r)·u(z_t, r, t | y) on a uniform grid from t = 1 to 0; with one step,
    z_0 = z_1 − u(z_1, 0, 1). No guidance: MeanFlow trains it into u."""
    t_steps = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    x = z.double()
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        t = torch.full((len(x),), float(t_cur), device=x.device)
        r = torch.full((len(x),), float(t_next), device=x.device)
        x = x - (t_cur - t_next) * model(x.float(), t, y, r=r).double()
    return x.float()


def model_evaluations(sampler, num_steps):
    """Network evaluations per sample (each is two batched forwards where guidance applies)."""
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


class SampleRandomness:
    """One random stream per sample index i, numpy's generator seeded with (seed, i): sample i's label, starting noise
    and SDE noise do not depend on its batch, the number of processes, or an interruption."""

    def __init__(self, seed, indices):
        self.rngs = [np.random.default_rng([seed, i]) for i in indices]

    def labels(self, num_classes):
        return torch.tensor([int(rng.integers(num_classes)) for rng in self.rngs])  # (N,), uniform as DiT / REPA

    def normal(self, shape):
        return torch.from_numpy(np.stack([rng.standard_normal(shape) for rng in self.rngs]))  # (N, *shape) float64


def generate(model, vae, indices, *, seed, sampler="euler", num_steps=50, cfg_scale=1.0, interval=(0.0, 1.0),
             bf16=False, labels=None):
    """uint8 images (N, H, W, 3) on the CPU for the given sample indices (labels drawn per sample if not given)."""
    device = next(model.parameters()).device
    rand = SampleRandomness(seed, indices)
    y = (rand.labels(model.num_classes) if labels is None else labels).to(device)
    z = rand.normal((model.in_channels, model.input_size, model.input_size)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if sampler == "sde":
            x = euler_maruyama_sampler(model, z, y, num_steps, cfg_scale, interval,
                                       noise=lambda like: rand.normal(like.shape[1:]).to(like.device))
        elif sampler == "meanflow":
            x = meanflow_sampler(model, z, y, num_steps)
        else:
            x = euler_sampler(model, z, y, num_steps, cfg_scale, interval, heun=sampler == "heun")
    if vae is not None:
        x = decode_latents(vae, x, bf16=bf16)
    return to_uint8(x.cpu())


def to_uint8(x):
    """Images in [-1, 1], (N, 3, H, W) → (N, H, W, 3) uint8 by clamp(127.5·x + 128) rounded down, i.e. rounded to
    nearest (DiT / SiT); REPA's 255·(x + 1)/2 rounded down is up to one level lower."""
    return (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(images, columns, path):
    """uint8 images (N, H, W, 3) → one PNG, `columns` images per row, 2-pixel white borders."""
    grid = make_grid(images.permute(0, 3, 1, 2), nrow=columns, padding=2, pad_value=255)  # (3, H', W')
    save_png(grid.permute(1, 2, 0), path)


def save_png(image, path):
    with replace_atomically(path) as tmp:
        Image.fromarray(image.numpy()).save(tmp, format="PNG")


def save_json(settings, path):
    with replace_atomically(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=1) + "\n")


def write_npz(folder, num_samples, path):
    """Pack folder/000000.png … into `path` with one array `arr_0` (N, H, W, 3) uint8, as the ADM evaluator reads.
    The .npy inside the (uncompressed) zip is streamed image by image: 50K images never sit in memory at once."""
    first = np.asarray(Image.open(folder / f"{0:06d}.png"))
    header = {**np.lib.format.header_data_from_array_1_0(first), "shape": (num_samples, *first.shape)}
    with replace_atomically(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for i in tqdm(range(num_samples), desc="packing .npz"):
                image = np.asarray(Image.open(folder / f"{i:06d}.png"))
                if image.shape != first.shape:
                    raise UserError(f"{folder / f'{i:06d}.png'} has shape {image.shape}, not {first.shape}")
                f.write(image.tobytes())


def beside(path, suffix):
    """path + suffix; not Path.with_suffix, which would cut a name like "…-interval-0-0.7" at its dot."""
    return path.parent / f"{path.name}{suffix}"


def load_sampling_model(path, weights="ema", model_name=None):
    """(network in eval mode, description) for a checkpoint of one of three kinds, told apart by their keys:

    - this project's training checkpoint: a dict with "model", "ema" and "args" (a dict); `weights` picks the set;
    - REPA's last.pt: a bare state dict with projectors and 4 output channels, in REPA's time convention (ours);
    - the official SiT-XL-2-256.pt: bare, no projectors, learn_sigma's 8 output channels, in SiT's time convention
      (t = 1 data), which the model converts (`sit_time=True`).
    Any other file is refused, saying what it holds: its time convention cannot be known. The architecture is read
    off the weights; training-only heads (REPA projectors, SRA head) are not built; the rest loads strictly.
    DiT's checkpoints have SiT's layout but predict ε: they cannot be told apart, and give noise here."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--ckpt {path} does not exist")
    if not zipfile.is_zipfile(path):  # what torch.save writes (and the only format torch.load's mmap reads)
        raise UserError(f"{path} is not a checkpoint: not a torch file, or a truncated one")
    try:  # memory-mapped: every rank of a node reads the same pages instead of its own copy of an 11 GB file
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch reports foreign pickles as UnpicklingError or RuntimeError, depending on version
        found = re.search(r"GLOBAL (\S+)", str(e))  # the class that weights_only refused to unpickle
        holds = f"a pickled {found[1]}, which does not load safely" if found else f"what torch cannot read ({e})"
        raise UserError(f"{path} is not a checkpoint this script reads: a torch file holding {holds}") from None
    training = isinstance(ckpt, dict) and {"model", "ema", "args"} <= ckpt.keys()
    if training:
        if not isinstance(ckpt["args"], dict):
            raise UserError(f"{path}: its training arguments are a {type(ckpt['args']).__name__}, not a dict")
        state_dict, train_args, kind = ckpt[weights], ckpt["args"], "DiverseDiT training checkpoint"
    else:
        if not (isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())):
            keys = f" with keys {list(ckpt)[:8]}" if isinstance(ckpt, dict) and ckpt else ""
            raise UserError(f"{path} is neither a training checkpoint of this project (a dict with model, ema and "
                            f"args) nor a SiT / REPA state dict of tensors; it holds a {type(ckpt).__name__}{keys}")
        if weights != "ema":
            raise UserError(f"{path} is a bare state dict, one set of weights (the released EMA): --weights {weights} "
                            f"is for this project's training checkpoints only")
        if any(key.startswith("module.") for key in ckpt):
            raise UserError(f"{path}: keys start with 'module.' (saved from a DDP wrapper); strip that prefix first")
        state_dict, train_args, kind = ckpt, {}, "a bare state dict"
    try:
        name, config = config_from_state_dict(state_dict)
    except ValueError as e:
        raise UserError(f"{path} ({kind}): {e}") from None
    sit_time = not training and config["learn_sigma"]
    if not training:  # the official SiT file or REPA's last.pt, told apart by their heads
        projectors = any(key.startswith("projectors.") for key in state_dict)
        ours = [head for head in ("skip_linears", "sra_head") if any(key.startswith(head + ".") for key in state_dict)]
        if ours or projectors == config["learn_sigma"]:
            also = f", {' and '.join(ours)}" if ours else ""
            raise UserError(f"{path} is a bare state dict, neither the official SiT file (learn_sigma, no "
                            f"projectors) nor REPA's last.pt (projectors, no learn_sigma): it has learn_sigma="
                            f"{config['learn_sigma']}, projectors={projectors}{also}, so its time convention is "
                            f"unknown: sample from the training checkpoint it came from.")
        kind = "SiT state dict (SiT's time convention)" if sit_time else "REPA state dict (REPA's time convention)"
    for claimed, source in ((model_name, "--model"), (train_args.get("model"), "its training arguments")):
        if claimed is not None and claimed != name:
            raise UserError(f"{source}: {claimed}, but {path} ({kind}) holds the weights of a {name}")
    if config["in_channels"] not in (LATENT_CHANNELS, 3):
        raise UserError(f"{path} holds a model of {config['in_channels']} input channels: neither SD-VAE latents "
                        f"({LATENT_CHANNELS}) nor RGB pixels (3)")
    model = build_model(name, sit_time=sit_time, **config)
    model.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith(TRAINING_HEADS)}, strict=True)
    description = {"checkpoint_kind": kind, "weights": weights, "model": name, "sit_time": sit_time,
                   "training_data": train_args.get("data_path"), **config}
    return model.eval().requires_grad_(False), description


def run_name(args, description):
    """The outputs' name, DiT / SiT style: the checkpoint (run folder and step for a training checkpoint), the model
    unless that name says it, and every setting that changes the images."""
    ckpt = Path(args.ckpt)
    stem = f"{ckpt.parent.parent.name}-{ckpt.stem}" if ckpt.parent.name == "checkpoints" else ckpt.stem
    model = description["model"].replace("/", "-")
    name = (stem if model in stem else f"{model}-{stem}") + f"-{args.weights}-{args.sampler}{args.num_steps}"
    name += f"-cfg{args.cfg_scale:g}"
    if (args.guidance_low, args.guidance_high) != (0.0, 1.0):
        name += f"-interval{args.guidance_low:g}-{args.guidance_high:g}"
    if description["in_channels"] == LATENT_CHANNELS:
        name += f"-vae-{Path(args.vae).stem}"
    return name + f"-{args.precision}-seed{args.seed}"


def settings_record(args, description, labels):
    """Everything that decides the images, for the JSON beside the outputs."""
    latent = description["in_channels"] == LATENT_CHANNELS
    return {
        "checkpoint": str(Path(args.ckpt).resolve()), "checkpoint_sha256": file_sha256(args.ckpt), **description,
        "sampler": args.sampler, "num_steps": args.num_steps,
        "model_evaluations": model_evaluations(args.sampler, args.num_steps),
        "cfg_scale": args.cfg_scale, "guidance_interval": [args.guidance_low, args.guidance_high],
        "precision": args.precision, "tf32": args.tf32, "seed": args.seed,
        "per_proc_batch_size": args.per_proc_batch_size, "num_samples": args.num_fid_samples, "labels": labels,
        "vae": args.vae if latent else None, "vae_sha256": file_sha256(vae_weights_path(args.vae)) if latent else None,
        "uint8": "clamp(127.5·x + 128, 0, 255) rounded down",
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "pillow": Image.__version__},
        "code": [git_commit()],
    }


def draw(model, vae, args, batches, labels=None, disable=False):
    """Yield (batch, uint8 images (N, H, W, 3)) per batch of sample indices, under a progress bar over images that
    also shows (by a forward hook) the evaluation reached within the batch: one batch may take minutes on a CPU."""
    evaluations = model_evaluations(args.sampler, args.num_steps)
    settings = dict(seed=args.seed, sampler=args.sampler, num_steps=args.num_steps, cfg_scale=args.cfg_scale,
                    interval=(args.guidance_low, args.guidance_high), bf16=args.precision == "bf16")
    with tqdm(total=sum(map(len, batches)), unit="image", desc="sampling", disable=disable) as bar:
        count = itertools.count()
        hook = model.register_forward_hook(
            lambda *_: bar.set_postfix_str(f"evaluation {next(count) % evaluations + 1}/{evaluations} of the batch"))
        try:
            for batch in batches:
                yield batch, generate(model, vae, batch, labels=None if labels is None else labels[batch], **settings)
                bar.update(len(batch))
        finally:
            hook.remove()


def main(args):
    check_args(args)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    rank, world_size, device = init_distributed()
    sample_outputs(args, rank, world_size, device)
    close_distributed()


def check_args(args):
    """Fills in --num-steps and refuses bad settings, before anything is loaded (evaluate.py checks its own too)."""
    if args.sampler not in DEFAULT_STEPS:  # evaluate.py's --sampler has no argparse choices
        raise UserError(f"--sampler {args.sampler}: choose one of {', '.join(DEFAULT_STEPS)}")
    args.num_steps = DEFAULT_STEPS[args.sampler] if args.num_steps is None else args.num_steps
    for flag, value in [("--num-steps", args.num_steps), ("--per-proc-batch-size", args.per_proc_batch_size),
                        ("--images-per-class", args.images_per_class), ("--num-fid-samples", args.num_fid_samples)]:
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not 0.0 <= args.guidance_low <= args.guidance_high <= 1.0:
        raise UserError(f"the guidance interval must satisfy 0 ≤ low ≤ high ≤ 1, got [{args.guidance_low}, "
                        f"{args.guidance_high}]")
    if args.num_fid_samples is not None and args.class_labels:
        raise UserError("--class-labels sets a grid's rows; FID batches draw labels uniformly per sample")


def sample_outputs(args, rank, world_size, device):
    """Writes the grid or FID batch of checked `args`; returns (their path without suffix, the model's description)."""
    model, description = load_sampling_model(args.ckpt, args.weights, args.model)
    meanflow = description["meanflow"]
    if meanflow != (args.sampler == "meanflow"):
        raise UserError(f"{args.ckpt} holds a {'MeanFlow' if meanflow else 'flow-matching'} model: "
                        f"use --sampler {'meanflow' if meanflow else 'euler, heun or sde'}")
    if meanflow and args.cfg_scale != 1.0:
        raise UserError("MeanFlow trains guidance into the network: sample it with --cfg-scale 1")
    model.to(device)
    vae = load_vae(args.vae, device) if description["in_channels"] == LATENT_CHANNELS else None
    stem = Path(args.sample_dir) / run_name(args, description)
    if args.num_fid_samples is not None:
        sample_fid_batch(model, vae, args, description, stem, rank, world_size)
    elif rank == 0:  # a grid is one process's work
        sample_grid(model, vae, args, description, stem)
    return stem, description


def sample_grid(model, vae, args, description, stem):
    """A PNG grid: one row per class, `images_per_class` columns; on the built-in data, the classifier's verdict."""
    if not all(0 <= c < model.num_classes for c in args.class_labels or []):
        raise UserError(f"--class-labels must lie in 0..{model.num_classes - 1}, got {args.class_labels}")
    labels = grid_labels(model.num_classes, args.class_labels, args.images_per_class)
    classes = labels[::args.images_per_class].tolist()
    settings = {**settings_record(args, description, classes), "images_per_class": args.images_per_class}
    print(json.dumps(settings, indent=1))
    stem = beside(stem, f"-grid-{'-'.join(map(str, classes))}-x{args.images_per_class}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    batches = [batch.tolist() for batch in torch.arange(len(labels)).split(args.per_proc_batch_size)]
    images = torch.cat([images for _, images in draw(model, vae, args, batches, labels)])  # (N, H, W, 3)
    save_grid(images, args.images_per_class, beside(stem, ".png"))
    save_json(settings, beside(stem, ".json"))
    print(f"saved {beside(stem, '.png')}")
    if description["training_data"] == BUILTIN_DATA:  # the quick start's question: has it learned the shapes?
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W) in [-1, 1], as ShapesDataset's
        recognised = (shapes_classifier(x.shape[-1])(x).argmax(dim=1) == labels).sum().item()
        print(f"the built-in data's classifier recognises {recognised}/{len(labels)} samples as their requested shape")


def sample_fid_batch(model, vae, args, description, folder, rank, world_size):
    """folder/000000.png … and folder.npz: exactly `num_fid_samples` images (DiT / REPA round up to a multiple of the
    global batch and drop the extras), labels uniform per sample, split over ranks. A continued run must have the
    settings of folder.json, and writes only the missing batches."""
    if rank == 0:
        settings = settings_record(args, description, "uniform random per sample")
        print(json.dumps(settings, indent=1))
        folder.mkdir(parents=True, exist_ok=True)
        record = beside(folder, ".json")
        if record.is_file():
            try:
                old = json.loads(record.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{record} is damaged ({e}): delete it, or move the outputs beside it away") from None
            changed = [key for key in settings if key != "code" and old.get(key) != settings[key]]
            if changed:
                raise UserError(f"{record} records other settings for these outputs ({', '.join(changed)} differ); "
                                f"move the old outputs away or change --sample-dir")
            if settings["code"][0] not in old["code"]:  # continued with other code: say so in the record
                settings["code"] = old["code"] + settings["code"]
        save_json(settings, record)
    barrier()
    # Fixed batches of sample indices, so a batch recomputed after an interruption is the same batch.
    batches = [batch.tolist() for batch in torch.arange(args.num_fid_samples).split(args.per_proc_batch_size)]
    pending = [batch for batch in batches if not all((folder / f"{i:06d}.png").is_file() for i in batch)]
    barrier()  # every rank has listed the same pending batches before any writes
    if rank == 0 and len(pending) < len(batches):
        print(f"continuing: {len(batches) - len(pending)} of {len(batches)} batches are already written")
    for batch, images in draw(model, vae, args, pending[rank::world_size], disable=rank != 0):
        for i, image in zip(batch, images):
            save_png(image, folder / f"{i:06d}.png")
    barrier()
    npz = beside(folder, ".npz")
    if rank == 0 and not npz.is_file():
        write_npz(folder, args.num_fid_samples, npz)
        print(f"saved {npz} ({args.num_fid_samples} images)")


if __name__ == "__main__":
    run(main, build_parser().parse_args())
