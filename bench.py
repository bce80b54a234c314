"""The speed figures this project quotes, each measured by one command.

    python bench.py step [--model SiT-B/2 --batch-size 8 --steps 10 --compile]
    python bench.py data [--batch-size 256 --num-workers 2 --num-images 4096]
    python bench.py gpu [--model SiT-B/2 --peak-tflops 989.5 --out bench-gpu.json --smoke]

step: a float32 training step of the bare model (forward, backward, AdamW) of SiT, SiT + L_div, SiT + long residuals
and both (DiverseDiT), eager or --compile; and L_div alone, which resolves its share more precisely than whole steps.
data: samples / s of a synthetic prepared folder (data.py's layout, in the page cache) through a shuffling
DataLoader, with and without the images REPA needs.
gpu: everything a user's GPU run depends on (`bench_gpu`), at most 8 minutes on one CUDA device, one table with
targets, also JSON (--out, rewritten after each row); without CUDA it refuses, unless --smoke (tiny sizes, CPU too).
Compared runs are interleaved in an order rotated each round; a ratio is the median of per-round ratios, which
cancels slow drifts of the machine's speed. Results print as Markdown tables.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

DEFAULTS = {  # benchmark: the defaults of its flags left unset
    "step": {"model": "SiT-B/2", "batch_size": 8}, "data": {"batch_size": 256, "num_images": 4096},
    "gpu": {"batch_size": 32}}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", nargs="?", default="step", choices=list(DEFAULTS))
    parser.add_argument("--model", help="default: SiT-B/2 for step; gpu: train only this one (default: SiT-B/2 and "
                                        "SiT-XL/2)")
    parser.add_argument("--batch-size", type=int, help="default: 8 for step, 256 for data, 32 for gpu (the paper's "
                                                       "256 over 8 GPUs)")
    parser.add_argument("--image-size", type=int, default=256, choices=[256, 512])
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one run of each variant per round)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--compile", action="store_true", help="step: torch.compile each variant's forward and loss")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--num-workers", type=int, default=2, help="data: DataLoader workers")
    parser.add_argument("--num-images", type=int, help="data: size of the synthetic folder (4096)")
    parser.add_argument("--peak-tflops", type=float, help="gpu: the device's bf16 peak (default: PEAK_BF16_TFLOPS)")
    parser.add_argument("--out", default="bench-gpu.json", help="gpu: the table's rows as JSON (bench-gpu.json)")
    parser.add_argument("--smoke", action="store_true", help="gpu: tiny sizes, on the CPU too (its code path only)")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad flags answer here, before the heavy imports below

import numpy as np
import torch
from torch._dynamo.testing import CompileCounter
from torch.utils.data import DataLoader

import data
import fid
import train
from encoders import ViT
from models import build_model
from runtime import UserError, replace_atomically, run
from sample import generate
from vae import DOWNSAMPLING, LATENT_CHANNELS, AutoencoderKL

VARIANTS = {"SiT": [], "SiT + L_div": ["--diversity-loss"],  # name: train.py's flags
            "SiT + long residual": ["--long-residual"], "DiverseDiT (both)": ["--diverse"]}


def clock(device):  # time.perf_counter() once the device has finished the work queued so far
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed_rounds(runs, rounds, warmup, device):
    """{name: [s per round]}: each of `runs` once a round, in a rotated order, after `warmup` untimed rounds."""
    names, times = list(runs), {name: [] for name in runs}
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = clock(device)
            runs[name]()
            if r >= warmup:
                times[name].append(clock(device) - start)
    return times


def table(title, header, rows):
    print(f"\n{title}\n")
    for row in [header, ["---"] * len(header), *rows]:
        print("| " + " | ".join(row) + " |")


def machine(device):
    return f"{device.type} ({torch.get_num_threads()} threads)"


def train_setup(name, flags, args, device, encoder=None):
    """(model, train.py's resolved arguments, `train.training_losses`' settings) for train.py's `flags` on model `name`
    at --image-size, built as train.py builds them; `encoder` is REPA's target encoder."""
    train_args = train.resolve_args(train.parse_args(["--model", name, "--data-path", "synthetic", *flags]))
    encoders = [encoder] * len(train_args.enc_type or ())
    with torch.device(device):
        model = build_model(name, input_size=args.image_size // DOWNSAMPLING, long_residual=train_args.long_residual,
                            z_dims=[e.embed_dim for e in encoders], encoder_depth=train_args.encoder_depth,
                            projector_dim=train_args.projector_dim, sra_depth=train_args.sra_student_block)
    return model.train(), train_args, dict(block_losses=train.block_losses_for(train_args, model.depth),
                                           encoders=encoders)


def random_batch(args, num_classes, device):
    """Latents of --image-size images, labels, uint8 images (REPA's encoder input): (N, C, h, h), (N,), (N, 3, S, S)."""
    N, S = args.batch_size, args.image_size
    return (torch.randn(N, LATENT_CHANNELS, S // DOWNSAMPLING, S // DOWNSAMPLING, device=device),
            torch.randint(0, num_classes, (N,), device=device),
            torch.randint(0, 256, (N, 3, S, S), dtype=torch.uint8, device=device))


def make_train_step(model, train_args, losses, args, device, compiled=None):
    """One AdamW step (fused on CUDA, as train.py's) of train.py's total loss on a fixed `random_batch`, t and ε drawn
    afresh; `compiled`: the torch.compile backend of the network alone (as train.py), None for eager."""
    x, y, images = random_batch(args, model.num_classes, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_args.lr, weight_decay=train_args.weight_decay,
                                  fused=device.type == "cuda")
    network = torch.compile(model, backend=compiled) if compiled else model

    def step():
        loss = train.total_loss(train.training_losses(network, x, y, images, **losses), train_args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def l_div_seconds(model, losses, args, device):
    """Median time of w·L_div's forward and backward alone (eager, as train.py runs it) on the blocks' outputs of one
    training forward (under bf16 autocast if `losses` says so)."""
    x, y, _ = random_batch(args, model.num_classes, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=losses.get("bf16", False)):
        blocks = model(x, torch.rand(len(x), device=device), y, return_features=True)[1].blocks  # L × (N, T, D)
    blocks = [block.requires_grad_() for block in blocks]

    def l_div():
        terms = losses["block_losses"](blocks)
        (terms["w"] * terms["div"]).backward()
    return statistics.median(timed_rounds({"": l_div}, args.steps, args.warmup, device)[""])


def bench_step(args, device):
    torch.manual_seed(0)
    steps = {}
    for name, flags in VARIANTS.items():
        model, train_args, losses = train_setup(args.model, flags, args, device)
        if args.compile and losses["block_losses"]:  # L_div compiled apart (train.py keeps it eager)
            losses["block_losses"] = torch.compile(losses["block_losses"])
        steps[name] = make_train_step(model, train_args, losses, args, device, "inductor" if args.compile else None)
    times = timed_rounds(steps, args.steps, args.warmup, device)
    alone, sit = l_div_seconds(model, losses, args, device), statistics.median(times["SiT"])  # DiverseDiT's L_div
    rows = [[name, f"{statistics.median(ts):.3f}", f"{statistics.median(np.divide(ts, times['SiT'])):.3f}×"]
            for name, ts in times.items()]
    table(f"{args.model}, batch {args.batch_size}, {args.image_size} px, fp32, {machine(device)}, "
          f"{'torch.compile' if args.compile else 'eager'}, {args.steps} rounds after {args.warmup} warm-up steps",
          ["variant", "s / step (median)", "vs SiT (median of per-round ratios)"],
          rows + [["L_div alone (forward + backward)", f"{alone:.3f}", f"{alone / sit:.1%} of a SiT step"]])


def synthetic_prepared_folder(out, num_images, image_size, num_classes=1000):
    """A prepared folder in data.py's layout, filled with random moments and images (for timing only)."""
    N, S = num_images, image_size
    meta = {"format": data.FORMAT_VERSION, "image_size": S, "images": True, "batch_size": 64, "bf16": False,
            "num_images": N, "files_sha256": "synthetic", "vae_sha256": "synthetic",
            "classes": [f"c{c}" for c in range(num_classes)]}
    data.start_or_continue(out, meta, [f"c{i % num_classes}/{i}.JPEG" for i in range(N)], np.arange(N) % num_classes)
    rng = np.random.default_rng(0)
    np.load(out / data.MOMENTS, mmap_mode="r+")[:] = rng.standard_normal(
        (N, 2 * LATENT_CHANNELS, S // DOWNSAMPLING, S // DOWNSAMPLING))
    np.load(out / data.IMAGES, mmap_mode="r+")[:] = rng.integers(0, 256, (N, 3, S, S), dtype=np.uint8)
    np.save(out / data.STATUS, np.full(N, data.DONE, dtype=np.uint8))
    return out


def bench_data(args, device):  # the DataLoader reads on the CPU, whatever the device
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = synthetic_prepared_folder(Path(tmp) / "prepared", args.num_images, args.image_size)
        for images in (False, True):
            batches = iter(DataLoader(data.PreparedDataset(folder, images=images), batch_size=args.batch_size,
                                      shuffle=True, num_workers=args.num_workers, drop_last=True))
            next(batches)  # untimed: the first batch includes starting the workers
            start = time.perf_counter()
            count = sum(len(batch[0]) for batch in batches)
            rows.append(["moments, label, image" if images else "moments, label",
                         f"{count / (time.perf_counter() - start):,.0f}"])
    table(f"PreparedDataset at {args.image_size} px, batch {args.batch_size}, shuffled, {args.num_workers} "
          f"DataLoader workers, {args.num_images} images in the page cache", ["items", "samples / s"], rows)


def extraction_rate(args, device):
    """fid.py's Inception features / s (float32, no TF32, as fid.py) of --num-images random --image-size images in
    batches of --batch-size, after a warm-up batch. Random weights: the speed does not depend on them. One random
    batch, repeated: drawing random images would cost more than reading an .npz."""
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model, S, n = fid.FIDInception().eval().to(device), args.image_size, args.batch_size
    pool = np.random.default_rng(0).integers(0, 256, (n, S, S, 3), dtype=np.uint8)  # (n, H, W, 3)

    def images(start, stop, size):
        return (pool[:min(stop, lo + size) - lo] for lo in range(start, stop, size))
    for count in (n, args.num_images):  # one warm-up batch, then the timed run
        start = clock(device)
        fid.extract_features(model, fid.Source(count, images, {}), n)
    return args.num_images / (clock(device) - start)


# Dense bf16 tensor-core peaks in TFLOP/s: NVIDIA's datasheets, without sparsity (half their "with sparsity" figures).
# The first key found in the device's name decides: PCIe and NVL cards come before their SXM namesakes.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H800 PCIe": 756, "H100 NVL": 835.5, "H200 NVL": 835.5, "H100": 989.5,
                    "H200": 989.5, "H800": 989.5, "B200": 2250, "A100": 312, "A800": 312, "L40S": 362.05,
                    "L40": 181.05, "L4": 121}
GPU_VARIANTS = {"SiT": [], "--diverse": ["--diverse"], "--repa --diverse": ["--repa", "--diverse"]}  # train.py's flags
GPU_SIZES = {  # the GPU run, and --smoke's: SiT-Tiny/2 on 4×4 latents of 32-px images, 4 tokens as its ViT's
    False: SimpleNamespace(models=("SiT-B/2", "SiT-XL/2"), image_size=256, batch_size=None, flags=[], doublings=4,
                           encoder=dict(width=768, depth=12, heads=12, grid=16),  # DINOv2-B/14's size: 256 × 768
                           sample_batch=32, sample_steps={"euler": 50, "sde": 250}, fid_batch=64,  # fid.py's default
                           fid_images=4096, suite=fid.STANDARD_COUNTS, feature_dims=(2048, 2023, 1008)),
    True: SimpleNamespace(models=("SiT-Tiny/2",), image_size=32, batch_size=2, doublings=1, flags=[
        "--encoder-depth", "4", "--projector-dim", "64", "--sra-student-block", "2", "--sra-teacher-block", "4"],
        encoder=dict(width=32, depth=1, heads=2, grid=2), sample_batch=1, sample_steps={"euler": 3, "sde": 3},
        fid_batch=2, fid_images=2, suite=(20, 10), feature_dims=(8, 8, 10))}


def forward_flops(model):
    """FLOPs of one image's forward through the SiT `model` with return_features (REPA projectors and SRA head
    included): matrix products and convolutions at 2 FLOPs per multiply-add (DiT's "Gflops" count multiply-adds);
    norms, activations, softmax and other elementwise work left out. T tokens, D width, L blocks, p patch, C input
    and C' output channels:

        each block       24·T·D² (qkv, proj, the 4·D MLP) + 4·T²·D (QKᵀ, AV) + 12·D² (adaLN, once per image)
        patch embedding  2·T·C·p²·D;  final layer 2·T·D·p²·C' + 4·D² (adaLN);  timestep MLP 2·(256·D + D²)
        long residuals   4·T·D² for each of the L/2 fusions (Linear 2D → D on every token)
        REPA projectors, SRA head: 2·T per weight of their Linears (D → P → P → Z: 2·T·(D·P + P² + P·Z))

    SiT-XL/2 at 256 px: 237 GFLOPs (DiT: 118.6 G multiply-adds). A training step costs about 3× the forward (the
    backward takes two products per forward product). REPA's frozen encoder is left out: MFU is the SiT's work."""
    D, T, L, p = model.pos_embed.shape[-1], model.x_embedder.num_patches, model.depth, model.patch_size
    heads = [*model.projectors, *([model.sra_head] if model.sra_depth else [])]
    head_weights = sum(layer.weight.numel() for head in heads for layer in head if isinstance(layer, torch.nn.Linear))
    per_token = (24 * L * D * D + 2 * p * p * D * (model.in_channels + model.out_channels) + 2 * head_weights
                 + 4 * D * D * (L // 2) * model.long_residual)
    frequencies = model.t_embedder.frequency_embedding_size
    return T * per_token + 4 * L * T * T * D + (12 * L + 4) * D * D + 2 * (frequencies * D + D * D)


def measure_step(model, train_args, losses, args, device, compiled, flops, peak):
    """make_train_step's images / s, model TFLOP/s (`flops` per image), MFU, peak memory, first step (compiling)."""
    torch._dynamo.reset()  # each compiled run anew: SiT.forward's code cache would fill up across models
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step, start = make_train_step(model, train_args, losses, args, device, compiled), clock(device)
    step()
    first = clock(device) - start
    images = args.batch_size / statistics.median(timed_rounds({"": step}, args.steps, args.warmup, device)[""])
    tflops = images * flops / 1e12
    return {"images/s": images, "TFLOP/s": tflops, "% MFU": 100 * tflops / peak if peak else None,
            "GiB peak": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "s first step": first}


def compile_health(model, train_args, losses, args, device):
    """(graph breaks, recompilations) of the network compiled as train.py compiles it: dynamo's explanation of one
    bf16 training forward, and a counting backend over --steps training steps, each on a new `random_batch` and t."""
    torch._dynamo.reset()
    x, y, _ = random_batch(args, model.num_classes, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(x, torch.rand(len(x), device=device), y, return_features=True)
    for reason in explained.break_reasons:
        print(f"graph break: {reason}", file=sys.stderr)
    torch._dynamo.reset()
    counter, first = CompileCounter(), None
    network = torch.compile(model, backend=counter)
    for _ in range(args.steps):
        terms = train.training_losses(network, *random_batch(args, model.num_classes, device), **losses, bf16=True)
        train.total_loss(terms, train_args).backward()
        first = first or counter.frame_count
    return explained.graph_break_count, counter.frame_count - first


def with_batch(args, batch_size, **changes):
    return argparse.Namespace(**vars(args) | {"batch_size": batch_size, **changes})


def verdict(ok):
    return "n/a" if ok is None else "meets" if ok else "misses"


def bench_gpu(args, device):
    """Every figure a user's GPU run depends on (issue 17). Training: bare steps (`make_train_step`; data loading,
    clipping and EMA are `train`'s) under bf16 autocast, eager and compiled, at the paper's batch per GPU and, for SiT,
    the largest batch that a few eager doublings find to fit. REPA's DINOv2-B, the sampler, the SD-VAE and the
    Inception network have random weights (speed does not depend on them). The metric suite: its features at the
    measured rate, plus fid.adm_metrics on random features. --smoke: tiny sizes, dynamo's eager backend for inductor."""
    if device.type != "cuda" and not args.smoke and args.device is None:
        raise UserError("no CUDA device: `python bench.py gpu` measures a GPU (--smoke runs its code on tiny sizes)")
    smoke = args.smoke or device.type != "cuda"
    sizes = GPU_SIZES[smoke]
    args = with_batch(args, sizes.batch_size or args.batch_size, image_size=sizes.image_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine(device)
    peak = args.peak_tflops or next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.split()[0]
    except (OSError, IndexError):
        driver = "n/a"
    info = {"run": "bench.py gpu --smoke (tiny sizes: its code path, not its figures)" if smoke else "bench.py gpu",
            "device": name, "driver": driver, "torch": torch.__version__, "CUDA": torch.version.cuda,
            "bf16 peak TFLOP/s": peak, "peak from": "--peak-tflops" if args.peak_tflops else "PEAK_BF16_TFLOPS"}
    rows, start = [], time.perf_counter()

    def cells(figures):
        return " · ".join(f"{'n/a' if v is None else f'{v:,.0f}' if abs(v) >= 100 else f'{v:.3g}'} {unit}"
                          for unit, v in figures.items())

    def report(measurement, figures, target=""):
        rows.append({"measurement": measurement, "figures": figures, "target": target})
        print(f"[{time.perf_counter() - start:.0f} s] {measurement}: {cells(figures)} {target}", file=sys.stderr)
        with replace_atomically(Path(args.out)) as tmp:  # after each row: a run cut short keeps what it measured
            tmp.write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")

    # Training
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # train.py's and sample.py's
    encoder = ViT(**sizes.encoder, final_norm=True).to(device).eval().requires_grad_(False)
    breaks, recompiles = compile_health(*train_setup(sizes.models[0], ["--diverse", "--repa", "--sra", *sizes.flags],
                                                     args, device, encoder), args, device)
    report(f"compile health: {sizes.models[0]} --diverse --repa --sra, {args.steps} steps on new x, t, y",
           {"graph breaks": breaks, "recompilations": recompiles}, f"none: {verdict(breaks + recompiles == 0)}")
    for model_name in [args.model] if args.model and not smoke else sizes.models:
        plain = {}  # compile backend: SiT's images / s
        for variant, flags in GPU_VARIANTS.items():
            model, train_args, losses = train_setup(model_name, [*flags, *sizes.flags], args, device, encoder)
            losses["bf16"], flops = True, 3 * forward_flops(model)
            label = f"{model_name} {variant}" + (" (encoder: random-weight stand-in)" if "--repa" in flags else "")
            for compiled, mode in ((None, "eager"), ("eager" if smoke else "inductor", "compiled")):
                figures, target = measure_step(model, train_args, losses, args, device, compiled, flops, peak), ""
                if variant == "SiT":
                    plain[compiled] = figures["images/s"]
                    if compiled and model_name == sizes.models[-1]:
                        target = f"≥ 40% MFU: {verdict(None if peak is None else figures['% MFU'] >= 40)}"
                elif variant == "--diverse":
                    figures["% slower than SiT"] = 100 * (plain[compiled] / figures["images/s"] - 1)
                    target = f"≤ 10% slower: {verdict(figures['% slower than SiT'] <= 10)}"
                report(f"{label}, batch {args.batch_size}, bf16, {mode}", figures, target)
            batch = args.batch_size
            for _ in range(sizes.doublings if variant == "SiT" else 0):  # the largest batch that fits, eager
                try:
                    make_train_step(model, train_args, losses, with_batch(args, 2 * batch), device)()
                except torch.cuda.OutOfMemoryError:
                    break
                batch *= 2
            if batch > args.batch_size:
                report(f"{label}, batch {batch} (the largest of {sizes.doublings} doublings that fits), bf16, eager",
                       measure_step(model, train_args, losses, with_batch(args, batch), device, None, flops, peak))
            if variant == "--diverse":
                share = 100 * l_div_seconds(model, losses, args, device) * figures["images/s"] / args.batch_size
                report(f"{model_name} L_div alone (forward + backward, eager as in train.py), batch {args.batch_size}",
                       {"% of the compiled --diverse step": share}, f"≤ 2%: {verdict(share <= 2)}")
    # Sampling: the paper's Table 2 guidance (1.35 on t ∈ [0, 0.7])
    with torch.device(device):
        sampler = build_model(sizes.models[-1], input_size=args.image_size // DOWNSAMPLING).eval()
        vae = AutoencoderKL().eval()
    n = sizes.sample_batch
    for method, num_steps in sizes.sample_steps.items():
        for bf16 in (False, True):
            settings = dict(seed=0, sampler=method, cfg_scale=1.35, interval=(0.0, 0.7), bf16=bf16)
            generate(sampler, vae, range(n), num_steps=2, **settings)  # warm-up
            begin = clock(device)
            generate(sampler, vae, range(n), num_steps=num_steps, **settings)
            report(f"sampling {sizes.models[-1]} + SD-VAE decoder (random weights), {method} {num_steps} steps, "
                   f"guidance 1.35 on t ∈ [0, 0.7], batch {n}, {'bf16' if bf16 else 'fp32 (TF32 matmuls)'}",
                   {"images/s": n / (clock(device) - begin)})
    # Evaluation
    rate = extraction_rate(with_batch(args, sizes.fid_batch, num_images=sizes.fid_images), device)
    report(f"fid.py's Inception features (random weights), {args.image_size}-px images, batch {sizes.fid_batch}",
           {"images/s": rate})
    rng, (n_samples, n_ref) = np.random.default_rng(0), sizes.suite
    ref, samples = (fid.InceptionFeatures(*(rng.standard_normal((n, d), dtype=np.float32) for d in sizes.feature_dims))
                    for n in (n_ref, n_samples))
    begin = time.perf_counter()
    fid.adm_metrics(fid.Source(n_ref, None, {}), ref, fid.Source(n_samples, None, {}), samples)
    metrics = time.perf_counter() - begin
    total = (n_ref + n_samples) / rate + metrics
    report(f"fid.py's suite (FID, sFID, IS, precision / recall), {n_samples:,} samples vs {n_ref:,} references",
           {"s metrics": metrics, "s with features": total}, f"< 2 min: {verdict(total < 120)}")
    table(", ".join(f"{key}: {'n/a' if value is None else value}" for key, value in info.items())
          + f"; model FLOPs: 3 × forward_flops per image; {args.steps} steps timed after {args.warmup + 1}; {args.out}",
          ["measurement", "figures", "target"], [[r["measurement"], cells(r["figures"]), r["target"]] for r in rows])


BENCHMARKS = {"step": bench_step, "data": bench_data, "gpu": bench_gpu}


def main(args):
    for flag, default in DEFAULTS[args.benchmark].items():
        setattr(args, flag, getattr(args, flag) or default)
    BENCHMARKS[args.benchmark](args, torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))


if __name__ == "__main__":
    run(main, build_parser().parse_args())
