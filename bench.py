"""The speed figures this project quotes, each measured by one command.

    python bench.py step [--model SiT-B/2 --batch-size 8 --steps 10 --compile]
    python bench.py data [--batch-size 256 --num-workers 2 --num-images 4096]
    python bench.py sampler [--model SiT-Tiny/4 --batch-size 16 --num-steps 50 --steps 10]
    python bench.py train [--model SiT-B/2 --batch-size 8 --steps 5 --rounds 3]
    python bench.py fid [--batch-size 50 --num-images 200]

step: a float32 training step of the bare model (forward, backward, AdamW) for SiT, SiT + L_div, SiT + long
residual connections, and both (DiverseDiT), eager or with --compile; and L_div alone (forward + backward on
features of the step's shapes), which resolves its share of a step far more precisely than whole CPU steps, which
vary by a few per cent from round to round.
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
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

BENCHMARK_DEFAULTS = {  # model, batch
    "step": ("SiT-B/2", 8), "data": (None, 256), "sampler": ("SiT-Tiny/4", 16), "train": ("SiT-B/2", 8),
    "fid": (None, 50)}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", nargs="?", default="step", choices=list(BENCHMARK_DEFAULTS))
    parser.add_argument("--model", default=None, help="default: SiT-B/2 for step, SiT-Tiny/4 for sampler")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: 8 for step and train, 256 for data, 16 for sampler, 50 for fid")
    parser.add_argument("--image-size", type=int, default=256, choices=[256, 512])
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one run of each variant per round)")
    parser.add_argument("--num-steps", type=int, default=50, help="sampler: steps per sampling run")
    parser.add_argument("--rounds", type=int, default=3, help="train: alternations of train.py and the bare step")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--compile", action="store_true", help="step: torch.compile each variant's forward and loss")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--num-workers", type=int, default=2, help="data: DataLoader workers")
    parser.add_argument("--num-images", type=int, default=None,
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


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(runs, rounds, warmup, device):
    """{name: [seconds, one per round]}: each callable of `runs` once per round, in an order rotated every round;
    the first `warmup` rounds are not timed."""
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            runs[name]()
            synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times, base):
    return statistics.median(a / b for a, b in zip(times, base))


def table(title, header, rows):
    """Print `title`, then a Markdown table."""
    print(f"\n{title}\n")
    for row in [header, ["---"] * len(header), *rows]:
        print("| " + " | ".join(row) + " |")


def machine(device):
    return f"{device.type} ({torch.get_num_threads()} threads)"


def make_train_step(model, batch, with_diversity=False, compiled=False):
    """One step on `batch` = (x, ε, t, y) of the flow-matching objective, plus w(L_div)·L_div when asked (paper
    Sec. 3.2); with `compiled`, the network and the diversity loss are compiled apart (train.py compiles only the
    network: see train.main)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0)
    pairs = diversity_pairs(model.depth)
    network = torch.compile(model) if compiled else model
    l_div_of = torch.compile(diversity_loss) if compiled else diversity_loss

    def objective(x, eps, t, y):
        x_t, v = interpolate(x, eps, t)
        if not with_diversity:
            return flow_matching_loss(network(x_t, t, y), v).mean()
        v_pred, feats = network(x_t, t, y, return_features=True)
        l_div = l_div_of(feats.blocks, pairs).total
        return flow_matching_loss(v_pred, v).mean() + adaptive_weight(l_div) * l_div

    def step():
        optimizer.zero_grad(set_to_none=True)
        objective(*batch).backward()
        optimizer.step()

    return step


def latent_batch(args, num_classes, device):
    """(x, ε, t, y): random SD-VAE latents of --image-size images, noise, times and labels."""
    latent = args.image_size // DOWNSAMPLING
    x = torch.randn(args.batch_size, LATENT_CHANNELS, latent, latent, device=device)
    eps, t = torch.randn_like(x), torch.rand(args.batch_size, device=device)
    return x, eps, t, torch.randint(0, num_classes, (args.batch_size,), device=device)


def bench_step(args, device):
    torch.manual_seed(0)
    models = {name: build_model(args.model, input_size=args.image_size // DOWNSAMPLING, long_residual=long_residual)
              .to(device).train() for name, (long_residual, _) in VARIANTS.items()}
    plain = models["SiT"]
    batch = latent_batch(args, plain.num_classes, device)
    steps = {name: make_train_step(models[name], batch, with_diversity, args.compile)
             for name, (_, with_diversity) in VARIANTS.items()}
    times = timed_rounds(steps, args.steps, args.warmup, device)

    # The diversity loss alone, forward + backward, on L random (N, T, D) block features of the step's shapes.
    feats = [torch.randn(args.batch_size, plain.x_embedder.num_patches, plain.pos_embed.shape[-1], device=device,
                         requires_grad=True) for _ in range(plain.depth)]
    pairs = diversity_pairs(plain.depth)
    loss = torch.compile(diversity_loss) if args.compile else diversity_loss
    alone = timed_rounds({"L_div": lambda: loss(feats, pairs).total.backward()}, 5 * args.steps, 1, device)
    alone = statistics.median(alone["L_div"])

    rows = [[name, f"{statistics.median(ts):.3f}", f"{median_ratio(ts, times['SiT']):.3f}×"]
            for name, ts in times.items()]
    rows.append(["L_div alone (forward + backward)", f"{alone:.3f}",
                 f"{alone / statistics.median(times['SiT']):.1%} of a SiT step"])
    table(f"{args.model}, batch {args.batch_size}, {args.image_size} px, fp32, {machine(device)}, "
          f"{'torch.compile' if args.compile else 'eager'}, {args.steps} rounds after {args.warmup} warm-up steps",
          ["variant", "s / step (median)", "vs SiT (median of per-round ratios)"], rows)


def synthetic_prepared_folder(out, num_images, image_size, num_classes=1000):
    """A prepared folder in data.py's layout, filled with random moments and images (for timing only)."""
    N, S = num_images, image_size
    meta = {"format": data.FORMAT_VERSION, "image_size": S, "images": True, "batch_size": 64, "bf16": False,
            "num_images": N, "files_sha256": "synthetic", "vae_sha256": "synthetic",
            "classes": [f"c{c}" for c in range(num_classes)]}
    files = [f"c{i % num_classes}/{i}.JPEG" for i in range(N)]
    data.start_or_continue(out, meta, files, np.arange(N) % num_classes)
    rng = np.random.default_rng(0)
    np.load(out / data.MOMENTS, mmap_mode="r+")[:] = rng.standard_normal(
        (N, 2 * LATENT_CHANNELS, S // DOWNSAMPLING, S // DOWNSAMPLING))
    np.load(out / data.IMAGES, mmap_mode="r+")[:] = rng.integers(0, 256, (N, 3, S, S), dtype=np.uint8)
    np.save(out / data.STATUS, np.full(N, data.DONE, dtype=np.uint8))
    return out


def bench_data(args, device):  # the DataLoader reads on the CPU, whatever the device
    N, S = args.num_images, args.image_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = synthetic_prepared_folder(Path(tmp) / "prepared", N, S)
        for images in (False, True):
            loader = DataLoader(data.PreparedDataset(out, images=images), batch_size=args.batch_size, shuffle=True,
                                num_workers=args.num_workers, drop_last=True)
            count, start = 0, None
            for batch in loader:
                if start is None:  # the first batch includes starting the workers
                    start = time.perf_counter()
                    continue
                count += len(batch[0])
            rows.append(["moments, label, image" if images else "moments, label",
                         f"{count / (time.perf_counter() - start):,.0f}"])
    table(f"PreparedDataset at {S} px, batch {args.batch_size}, shuffled, {args.num_workers} DataLoader workers, "
          f"{N} images in the page cache", ["items", "samples / s"], rows)


def bench_train(args, device):
    """train.py runs on a synthetic prepared folder for 2K steps, logging every K: the second interval's rate is the
    steady state (the first includes start-up). Rounds alternate train.py and K bare steps."""
    K = args.steps
    model = build_model(args.model, input_size=args.image_size // DOWNSAMPLING).to(device).train()
    bare_step = make_train_step(model, latent_batch(args, model.num_classes, device))

    def bare_steps():
        for _ in range(K):
            bare_step()

    train_times, bare_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = synthetic_prepared_folder(Path(tmp) / "prepared", max(4 * K * args.batch_size, 64), args.image_size)
        for r in range(args.rounds):
            results = Path(tmp) / f"results{r}"
            train.main(train.parse_args([
                "--model", args.model, "--data-path", str(folder), "--global-batch-size", str(args.batch_size),
                "--max-steps", str(2 * K), "--log-every", str(K), "--sample-every", "0", "--results-dir",
                str(results), "--num-workers", str(args.num_workers), "--precision", "fp32", "--no-compile"]))
            metrics = (next(results.iterdir()) / "metrics.jsonl").read_text().splitlines()
            train_times.append(1 / json.loads(metrics[-1])["steps_per_sec"])
            shutil.rmtree(results)
            bare_step()  # warm-up
            bare_times.append(timed_rounds({"bare": bare_steps}, 1, 0, device)["bare"][0] / K)
    rows = [[str(r), f"{a:.3f}", f"{b:.3f}", f"{a / b:.3f}×"]
            for r, (a, b) in enumerate(zip(train_times, bare_times), 1)]
    rows.append(["median", "", "", f"{median_ratio(train_times, bare_times):.3f}×"])
    table(f"{args.model}, batch {args.batch_size}, {args.image_size} px latents, fp32, {machine(device)}, "
          f"{args.rounds} rounds of {K} steps, {args.num_workers} workers",
          ["round", "train.py s / step", "bare model s / step", "ratio"], rows)


def bench_fid(args, device):
    torch.manual_seed(0)
    model = fid.FIDInception().eval().to(device)  # random weights: the speed does not depend on them
    source = fid.Source(args.num_images, lambda start, stop, size: (
        np.random.default_rng(lo).integers(0, 256, (min(stop, lo + size) - lo, args.image_size, args.image_size, 3),
                                          dtype=np.uint8) for lo in range(start, stop, size)), {}, None)
    fid.extract_features(model, fid.Source(args.batch_size, source.batches, {}, None), args.batch_size)  # warm-up
    start = time.perf_counter()
    fid.extract_features(model, source, args.batch_size)
    extraction = args.num_images / (time.perf_counter() - start)
    rng = np.random.default_rng(0)
    ref, samples = (rng.standard_normal((n, 2048), dtype=np.float32) for n in (10_000, 20_000))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fid.precision_recall(ref, samples)
    pr_seconds = time.perf_counter() - start
    peak_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2 ** 20  # KiB → GiB
    table(f"fid.py on {machine(device)}", ["measurement", "value"], [
        [f"feature extraction, {args.num_images} random {args.image_size}-px images, batch {args.batch_size}",
         f"{extraction:.2f} images / s"],
        ["precision / recall, 20,000 samples × 10,000 references, 2048-d",
         f"{pr_seconds:.1f} s, peak memory +{peak_growth:.2f} GiB"]])


def bench_sampler(args, device):
    torch.manual_seed(0)
    shapes = data.ShapesDataset()
    C, H, _ = shapes.input_shape
    model = build_model(args.model, input_size=H, in_channels=C, num_classes=shapes.num_classes).to(device).eval()
    n, K = args.batch_size, args.num_steps
    z = torch.randn(n, C, H, H, device=device)
    y = torch.randint(0, shapes.num_classes, (n,), device=device)
    rand = SampleRandomness(0, range(n))
    guided_steps = sum(1 for k in range(K) if 1 - k / K <= 0.7)
    # A network that costs nothing: a sampler's time with it is its own loop's.
    null = SimpleNamespace(forward_with_cfg=lambda x, t, y, cfg_scale: torch.zeros_like(x))

    @torch.no_grad()
    def forwards(batch):
        x, labels = torch.cat([z] * (batch // n)), torch.cat([y] * (batch // n))
        for k in range(K):
            model(x, torch.full((batch,), 1 - k / K, device=device), labels)

    def sde(network):
        euler_maruyama_sampler(network, z, y, K, noise=lambda like: rand.normal(like.shape[1:]).to(like.device))

    bare, bare2 = f"{K} forwards, batch {n}", f"{K} forwards, batch {2 * n}"
    runs = {  # name: (what to time, the bare-forward run it is compared with)
        bare: (lambda: forwards(n), None),
        f"euler, {K} steps": (lambda: euler_sampler(model, z, y, K), bare),
        "euler loop alone (network stubbed out)": (lambda: euler_sampler(null, z, y, K), bare),
        f"sde, {K} steps, per-sample noise": (lambda: sde(model), bare),
        "sde loop alone (network stubbed out)": (lambda: sde(null), bare),
        bare2: (lambda: forwards(2 * n), None),
        "euler, cfg 4, t in [0, 1]": (lambda: euler_sampler(model, z, y, K, 4.0), bare2),
        f"euler, cfg 4, t in [0, 0.7] ({guided_steps} of {K} steps guided)": (
            lambda: euler_sampler(model, z, y, K, 4.0, (0.0, 0.7)), bare2),
    }
    times = timed_rounds({name: fn for name, (fn, _) in runs.items()}, args.steps, args.warmup, device)
    rows = [[name, f"{statistics.median(times[name]):.3f}",
             "" if base is None else f"{median_ratio(times[name], times[base]):.3f}×"]
            for name, (_, base) in runs.items()]
    table(f"{args.model} on {C}×{H}×{H} inputs, batch {n}, fp32, {machine(device)}, {args.steps} rounds after "
          f"{args.warmup} warm-up rounds", ["run", "s (median)", "vs its bare forwards (median of per-round ratios)"],
          rows)


def main(args):
    default_model, default_batch = BENCHMARK_DEFAULTS[args.benchmark]
    args.num_images = args.num_images or {"data": 4096, "fid": 200}.get(args.benchmark)
    args.model = args.model or default_model
    args.batch_size = args.batch_size or default_batch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    {"step": bench_step, "data": bench_data, "sampler": bench_sampler, "train": bench_train,
     "fid": bench_fid}[args.benchmark](args, device)


if __name__ == "__main__":
    run(main, build_parser().parse_args())
