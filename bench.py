"""The speed figures this project quotes, each measured by one command.

    python bench.py step [--model SiT-B/2 --batch-size 8 --steps 10 --compile]
    python bench.py data [--batch-size 256 --num-workers 2 --num-images 4096]
    python bench.py sampler [--model SiT-Tiny/4 --batch-size 16 --num-steps 50 --steps 10]
    python bench.py train [--model SiT-B/2 --batch-size 8 --steps 5 --rounds 3]
    python bench.py fid [--batch-size 50 --num-images 200]

step: a float32 training step of the bare model (forward, backward, AdamW) for SiT, SiT + L_div, SiT + long
residual connections, and both (DiverseDiT), eager or with --compile; and L_div alone (forward + backward on
features of the step's shapes), which resolves its share of a step far more precisely than whole CPU steps do.
data: samples / s that a synthetic prepared folder (data.py's layout, in the page cache) serves through a shuffling
DataLoader, with and without the images REPA needs.
sampler: sample.py's samplers on the built-in data's workload (3×32×32, 10 classes), each against the bare network
forwards it makes (the difference is the loop's own cost); and guidance on all of [0, 1] against an interval.
train: a whole train.py step (data, losses, clipping, AdamW, EMA, bookkeeping) against the bare step of `step`.
fid: fid.py's feature extraction rate (random weights and images), and the time and peak memory of precision /
recall on 20,000 × 10,000 random 2048-d features.
Compared runs are interleaved round after round in a rotated order; a ratio is the median of per-round ratios,
which cancels slow drifts of the machine's speed. Results print as Markdown tables.
"""
import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

DEFAULTS = {  # benchmark: the defaults of its flags left unset
    "step": {"model": "SiT-B/2", "batch_size": 8}, "data": {"batch_size": 256, "num_images": 4096},
    "sampler": {"model": "SiT-Tiny/4", "batch_size": 16}, "train": {"model": "SiT-B/2", "batch_size": 8},
    "fid": {"batch_size": 50, "num_images": 200}}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", nargs="?", default="step", choices=list(DEFAULTS))
    parser.add_argument("--model", help="default: SiT-B/2 for step and train, SiT-Tiny/4 for sampler")
    parser.add_argument("--batch-size", type=int,
                        help="default: 8 for step and train, 256 for data, 16 for sampler, 50 for fid")
    parser.add_argument("--image-size", type=int, default=256, choices=[256, 512])
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one run of each variant per round)")
    parser.add_argument("--num-steps", type=int, default=50, help="sampler: steps per sampling run")
    parser.add_argument("--rounds", type=int, default=3, help="train: alternations of train.py and the bare step")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--compile", action="store_true", help="step: torch.compile each variant's forward and loss")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--num-workers", type=int, default=2, help="data: DataLoader workers")
    parser.add_argument("--num-images", type=int,
                        help="data: size of the synthetic folder (4096); fid: images to extract (200)")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad flags answer here, before the heavy imports below

import numpy as np
import torch
from torch.utils.data import DataLoader

import data
import fid
import train
from losses import adaptive_weight, diversity_loss, diversity_pairs, flow_matching_loss, interpolate
from models import build_model
from runtime import run
from sample import SampleRandomness, euler_maruyama_sampler, euler_sampler
from vae import DOWNSAMPLING, LATENT_CHANNELS

LEARNING_RATE = 1e-4  # SiT / REPA's AdamW learning rate (the step's cost does not depend on it)
VARIANTS = {"SiT": (False, False), "SiT + L_div": (False, True),  # name: (long residual connections, L_div)
            "SiT + long residual": (True, False), "DiverseDiT (both)": (True, True)}


def clock(device):  # time.perf_counter() once the device has finished the work queued so far
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed_rounds(runs, rounds, warmup, device):
    """{name: [seconds, one per round]}: each callable of `runs` once per round, in an order rotated every round;
    the first `warmup` rounds are not timed."""
    names, times = list(runs), {name: [] for name in runs}
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = clock(device)
            runs[name]()
            if r >= warmup:
                times[name].append(clock(device) - start)
    return times


def median_ratio(times, base):
    return statistics.median(a / b for a, b in zip(times, base))


def table(title, header, rows):
    print(f"\n{title}\n")
    for row in [header, ["---"] * len(header), *rows]:
        print("| " + " | ".join(row) + " |")


def machine(device):
    return f"{device.type} ({torch.get_num_threads()} threads)"


def make_train_step(model, args, device, with_diversity=False, compiled=False):
    """One AdamW step of the flow-matching loss, plus w(L_div)·L_div when asked (paper Sec. 3.2), on a fixed random
    batch of SD-VAE latents of --image-size images; with `compiled`, the network and L_div are compiled apart
    (train.py compiles only the network)."""
    N, h = args.batch_size, args.image_size // DOWNSAMPLING
    x, eps = torch.randn(2, N, LATENT_CHANNELS, h, h, device=device)  # latents and noise, (N, C, h, h) each
    t, y = torch.rand(N, device=device), torch.randint(0, model.num_classes, (N,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0)
    pairs = diversity_pairs(model.depth)
    network = torch.compile(model) if compiled else model
    l_div_of = torch.compile(diversity_loss) if compiled else diversity_loss

    def step():
        x_t, v = interpolate(x, eps, t)
        out = network(x_t, t, y, return_features=with_diversity)
        v_pred, feats = out if with_diversity else (out, None)
        loss = flow_matching_loss(v_pred, v).mean()
        if with_diversity:
            l_div = l_div_of(feats.blocks, pairs).total
            loss = loss + adaptive_weight(l_div) * l_div
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def bench_step(args, device):
    torch.manual_seed(0)
    steps = {}
    for name, (long_residual, with_diversity) in VARIANTS.items():
        model = build_model(args.model, input_size=args.image_size // DOWNSAMPLING, long_residual=long_residual)
        steps[name] = make_train_step(model.to(device).train(), args, device, with_diversity, args.compile)
    times = timed_rounds(steps, args.steps, args.warmup, device)
    # The diversity loss alone, forward + backward, on L random (N, T, D) block features of the step's shapes.
    feats = [torch.randn(args.batch_size, model.x_embedder.num_patches, model.pos_embed.shape[-1], device=device,
                         requires_grad=True) for _ in range(model.depth)]
    pairs = diversity_pairs(model.depth)
    l_div_of = torch.compile(diversity_loss) if args.compile else diversity_loss
    alone = timed_rounds({"L_div": lambda: l_div_of(feats, pairs).total.backward()}, 5 * args.steps, 1, device)
    alone, sit = statistics.median(alone["L_div"]), statistics.median(times["SiT"])
    rows = [[name, f"{statistics.median(ts):.3f}", f"{median_ratio(ts, times['SiT']):.3f}×"]
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
            count, start = 0, None
            for batch in DataLoader(data.PreparedDataset(folder, images=images), batch_size=args.batch_size,
                                    shuffle=True, num_workers=args.num_workers, drop_last=True):
                if start is None:  # the first batch includes starting the workers
                    start = time.perf_counter()
                    continue
                count += len(batch[0])
            rows.append(["moments, label, image" if images else "moments, label",
                         f"{count / (time.perf_counter() - start):,.0f}"])
    table(f"PreparedDataset at {args.image_size} px, batch {args.batch_size}, shuffled, {args.num_workers} "
          f"DataLoader workers, {args.num_images} images in the page cache", ["items", "samples / s"], rows)


def bench_train(args, device):
    """train.py runs on a synthetic prepared folder for 2K steps, logging every K: the second interval's rate is the
    steady state (the first includes start-up). Rounds alternate train.py and K bare steps."""
    K = args.steps
    model = build_model(args.model, input_size=args.image_size // DOWNSAMPLING).to(device).train()
    bare_step, ours, bare = make_train_step(model, args, device), [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = synthetic_prepared_folder(Path(tmp) / "prepared", max(4 * K * args.batch_size, 64), args.image_size)
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(dir=tmp) as results:  # removed after each round: checkpoints are large
                train.main(train.parse_args([
                    "--model", args.model, "--data-path", str(folder), "--global-batch-size", str(args.batch_size),
                    "--max-steps", str(2 * K), "--log-every", str(K), "--sample-every", "0", "--results-dir", results,
                    "--num-workers", str(args.num_workers), "--precision", "fp32", "--no-compile"]))
                metrics = next(Path(results).glob("*/metrics.jsonl")).read_text().splitlines()
            ours.append(1 / json.loads(metrics[-1])["steps_per_sec"])
            bare_step()  # warm-up
            start = clock(device)
            for _ in range(K):
                bare_step()
            bare.append((clock(device) - start) / K)
    table(f"{args.model}, batch {args.batch_size}, {args.image_size} px latents, fp32, {machine(device)}, "
          f"{args.rounds} rounds of {K} steps, {args.num_workers} workers",
          ["round", "train.py s / step", "bare model s / step", "ratio"],
          [[str(r), f"{a:.3f}", f"{b:.3f}", f"{a / b:.3f}×"] for r, (a, b) in enumerate(zip(ours, bare), 1)]
          + [["median", "", "", f"{median_ratio(ours, bare):.3f}×"]])


def bench_fid(args, device):
    torch.manual_seed(0)
    model = fid.FIDInception().eval().to(device)  # random weights: the speed does not depend on them
    shape = (args.image_size, args.image_size, 3)

    def images(start, stop, size):  # batches of random uint8 (n, H, W, 3) images, seeded by their first index
        for lo in range(start, stop, size):
            yield np.random.default_rng(lo).integers(0, 256, (min(stop, lo + size) - lo, *shape), dtype=np.uint8)

    for count in (args.batch_size, args.num_images):  # one warm-up batch, then the timed run
        start = time.perf_counter()
        fid.extract_features(model, fid.Source(count, images, {}, None), args.batch_size)
    extraction = args.num_images / (time.perf_counter() - start)
    rng = np.random.default_rng(0)
    ref, samples = (rng.standard_normal((n, 2048), dtype=np.float32) for n in (10_000, 20_000))
    rss, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    fid.precision_recall(ref, samples)
    seconds = time.perf_counter() - start
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 2 ** 20  # peak memory, KiB → GiB
    table(f"fid.py on {machine(device)}", ["measurement", "value"], [
        [f"feature extraction, {args.num_images} random {args.image_size}-px images, batch {args.batch_size}",
         f"{extraction:.2f} images / s"],
        ["precision / recall, 20,000 samples × 10,000 references, 2048-d",
         f"{seconds:.1f} s, peak memory +{growth:.2f} GiB"]])


def bench_sampler(args, device):
    torch.manual_seed(0)
    shapes = data.ShapesDataset()
    C, H, _ = shapes.input_shape
    model = build_model(args.model, input_size=H, in_channels=C, num_classes=shapes.num_classes).to(device).eval()
    n, K = args.batch_size, args.num_steps
    z, y = torch.randn(n, C, H, H, device=device), torch.randint(0, shapes.num_classes, (n,), device=device)
    rand = SampleRandomness(0, range(n))
    # A network that costs nothing: a sampler's time with it is its own loop's.
    null = SimpleNamespace(forward_with_cfg=lambda x, t, y, cfg_scale: torch.zeros_like(x))

    @torch.no_grad()
    def forwards(copies):  # a sampling run's K network forwards, on `copies` copies of the batch
        x, labels = torch.cat([z] * copies), torch.cat([y] * copies)
        for k in range(K):
            model(x, torch.full((copies * n,), 1 - k / K, device=device), labels)

    def sde(network):
        euler_maruyama_sampler(network, z, y, K, noise=lambda like: rand.normal(like.shape[1:]).to(like.device))

    bare, bare2 = f"{K} forwards, batch {n}", f"{K} forwards, batch {2 * n}"
    guided = f"{sum(1 for k in range(K) if 1 - k / K <= 0.7)} of {K} steps guided"
    runs = {  # name: (what to time, the bare-forward run it is compared with)
        bare: (lambda: forwards(1), None),
        f"euler, {K} steps": (lambda: euler_sampler(model, z, y, K), bare),
        "euler loop alone (network stubbed out)": (lambda: euler_sampler(null, z, y, K), bare),
        f"sde, {K} steps, per-sample noise": (lambda: sde(model), bare),
        "sde loop alone (network stubbed out)": (lambda: sde(null), bare),
        bare2: (lambda: forwards(2), None),
        "euler, cfg 4, t in [0, 1]": (lambda: euler_sampler(model, z, y, K, 4.0), bare2),
        f"euler, cfg 4, t in [0, 0.7] ({guided})": (lambda: euler_sampler(model, z, y, K, 4.0, (0.0, 0.7)), bare2)}
    times = timed_rounds({name: fn for name, (fn, _) in runs.items()}, args.steps, args.warmup, device)
    table(f"{args.model} on {C}×{H}×{H} inputs, batch {n}, fp32, {machine(device)}, {args.steps} rounds after "
          f"{args.warmup} warm-up rounds", ["run", "s (median)", "vs its bare forwards (median of per-round ratios)"],
          [[name, f"{statistics.median(times[name]):.3f}", "" if base is None else
            f"{median_ratio(times[name], times[base]):.3f}×"] for name, (_, base) in runs.items()])


BENCHMARKS = {"step": bench_step, "data": bench_data, "sampler": bench_sampler, "train": bench_train, "fid": bench_fid}


def main(args):
    for flag, default in DEFAULTS[args.benchmark].items():
        setattr(args, flag, getattr(args, flag) or default)
    BENCHMARKS[args.benchmark](args, torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))


if __name__ == "__main__":
    run(main, build_parser().parse_args())
