"""The speed figures this project quotes, each measured by one command.

    python bench.py step [--model SiT-B/2 --batch-size 8 --steps 10 --compile]
    python bench.py data [--batch-size 256 --num-workers 2 --num-images 4096]
    python bench.py sampler [--model SiT-Tiny/4 --batch-size 16 --num-steps 50 --steps 10]
    python bench.py train [--model SiT-B/2 --batch-size 8 --steps 5 --rounds 3]
    python bench.py fid [--batch-size 50 --num-images 200]

step: one training step of the bare model (forward, backward, AdamW update) in float32 on this machine's
device, for plain SiT, SiT + the diversity loss, SiT + long residual connections, and both (what DiverseDiT
adds to SiT). With --compile, each variant's forward and loss run through torch.compile (the backward is compiled
with them), and so does the diversity loss timed on its own.
The variants run interleaved, round after round, and each is compared with plain SiT in the same round;
medians are printed as a Markdown table. Whole CPU steps vary by a few per cent from round to round, so the
diversity loss is also timed on its own (forward and backward on block features of the step's shapes), which
resolves its share of a step far more precisely.

data: samples per second that a prepared folder (`data.py`) serves through a shuffling DataLoader, with and
without the images REPA needs; the folder is synthetic (random moments and images, written in the real layout)
and read from the page cache.

sampler: sample.py's samplers on the built-in dataset's workload (3×32×32 pixels, 10 classes), each against the
bare network forwards it makes, so that the difference is the sampler loop's own cost; and classifier-free
guidance over the whole time range against a guidance interval, where steps outside the interval make one forward
instead of a doubled one. Interleaved rounds and medians of per-round ratios, as for `step`.

train: a whole train.py step (data loading from a synthetic prepared folder, the posterior sample, the losses,
gradient clipping, AdamW, the EMA update and the bookkeeping) against the bare model step of `step`, plain SiT.

fid: fid.py's Inception feature extraction rate (random-weight network, random images), and the time and peak
memory of precision / recall on 20,000 × 10,000 random 2048-d features (10,000 × 10,000 distance blocks).
"""
import argparse
import json
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

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
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
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

LEARNING_RATE = 1e-4                      # SiT / REPA's AdamW learning rate (the step's cost does not depend on it)

VARIANTS = {  # name: (long residual connections, diversity loss)
    "SiT": (False, False),
    "SiT + L_div": (False, True),
    "SiT + long residual": (True, False),
    "DiverseDiT (both)": (True, True),
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_train_step(model, with_diversity, compiled=False):
    """One step of the flow-matching objective, plus w(L_div)·L_div when asked (paper Sec. 3.2); with `compiled`,
    the forward and the loss run through torch.compile."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0)
    pairs = diversity_pairs(model.depth)

    def objective(x, eps, t, y):
        x_t, v = interpolate(x, eps, t)
        if not with_diversity:
            return flow_matching_loss(model(x_t, t, y), v).mean()
        v_pred, feats = model(x_t, t, y, return_features=True)
        l_div = diversity_loss(feats.blocks, pairs).total
        return flow_matching_loss(v_pred, v).mean() + adaptive_weight(l_div) * l_div

    objective = torch.compile(objective) if compiled else objective

    def step(x, eps, t, y):
        optimizer.zero_grad(set_to_none=True)
        objective(x, eps, t, y).backward()
        optimizer.step()

    return step


def bench_step(args, device):
    torch.manual_seed(0)
    latent = args.image_size // DOWNSAMPLING
    models = {name: build_model(args.model, input_size=latent, long_residual=long_residual).to(device).train()
              for name, (long_residual, _) in VARIANTS.items()}
    x = torch.randn(args.batch_size, LATENT_CHANNELS, latent, latent, device=device)
    eps = torch.randn_like(x)
    t = torch.rand(args.batch_size, device=device)
    y = torch.randint(0, models["SiT"].num_classes, (args.batch_size,), device=device)

    steps = {name: make_train_step(models[name], with_diversity, args.compile)
             for name, (_, with_diversity) in VARIANTS.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step(x, eps, t, y)

    # Round after round, each variant runs once, in an order rotated every round; a variant's cost is the median
    # over rounds of its time divided by plain SiT's time in the same round, which cancels slow drifts of the
    # machine's speed.
    names = list(VARIANTS)
    times = {name: [] for name in names}
    for r in range(args.steps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            steps[name](x, eps, t, y)
            synchronize(device)
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times["SiT"])
    plain = models["SiT"]
    shapes = (plain.depth, args.batch_size, plain.x_embedder.num_patches, plain.pos_embed.shape[-1])  # (L, N, T, D)
    loss_alone = time_diversity_loss_alone(shapes, device, 5 * args.steps, args.compile)
    print(f"\n{args.model}, batch {args.batch_size}, {args.image_size} px, fp32, {device.type} "
          f"({torch.get_num_threads()} threads), {'torch.compile' if args.compile else 'eager'}, {args.steps} rounds "
          f"after {args.warmup} warm-up steps\n")
    print("| variant | s / step (median) | vs SiT (median of per-round ratios) |")
    print("|---|---|---|")
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, times["SiT"]))
        print(f"| {name} | {statistics.median(ts):.3f} | {ratio:.3f}× |")
    print(f"| L_div alone (forward + backward) | {loss_alone:.3f} | {loss_alone / base:.1%} of a SiT step |")


def time_diversity_loss_alone(shapes, device, rounds, compiled=False):
    """Median seconds of diversity_loss forward + backward on L random (N, T, D) block features."""
    depth, n, t, d = shapes
    feats = [torch.randn(n, t, d, device=device, requires_grad=True) for _ in range(depth)]
    pairs = diversity_pairs(depth)
    loss = torch.compile(diversity_loss) if compiled else diversity_loss
    times = []
    for _ in range(rounds + 1):  # the first round is a warm-up
        synchronize(device)
        start = time.perf_counter()
        loss(feats, pairs).total.backward()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


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


def bench_data(args):
    """Samples / s of PreparedDataset through a shuffling DataLoader, from a synthetic folder in the real layout."""
    N, S = args.num_images, args.image_size
    with tempfile.TemporaryDirectory() as tmp:
        out = synthetic_prepared_folder(Path(tmp) / "prepared", N, S)

        print(f"\nPreparedDataset at {S} px, batch {args.batch_size}, shuffled, {args.num_workers} DataLoader "
              f"workers, {N} images in the page cache\n")
        print("| items | samples / s |")
        print("|---|---|")
        for images in (False, True):
            loader = DataLoader(data.PreparedDataset(out, images=images), batch_size=args.batch_size, shuffle=True,
                                num_workers=args.num_workers, drop_last=True)
            count, start = 0, None
            for batch in loader:
                if start is None:  # the first batch includes starting the workers
                    start = time.perf_counter()
                    continue
                count += len(batch[0])
            print(f"| {'moments, label, image' if images else 'moments, label'} | "
                  f"{count / (time.perf_counter() - start):,.0f} |")


class NullNetwork(torch.nn.Module):
    """A stand-in network that costs nothing, so that a sampler's remaining time is its own loop."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward_with_cfg(self, x, t, y, cfg_scale):
        return torch.zeros_like(x)


def bench_train(args, device):
    """A whole train.py step against the bare model step (forward, backward, AdamW) at the same batch.

    train.py runs on a synthetic prepared folder for 2K steps, logging every K: the second interval's rate is the
    steady state (the first includes start-up). Rounds alternate train.py and the bare step.
    """
    K, latent = args.steps, args.image_size // DOWNSAMPLING
    model = build_model(args.model, input_size=latent).to(device).train()
    x = torch.randn(args.batch_size, LATENT_CHANNELS, latent, latent, device=device)
    eps, t = torch.randn_like(x), torch.rand(args.batch_size, device=device)
    y = torch.randint(0, model.num_classes, (args.batch_size,), device=device)
    bare_step = make_train_step(model, with_diversity=False)
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
            bare_step(x, eps, t, y)  # warm-up
            synchronize(device)
            start = time.perf_counter()
            for _ in range(K):
                bare_step(x, eps, t, y)
            synchronize(device)
            bare_times.append((time.perf_counter() - start) / K)
    print(f"\n{args.model}, batch {args.batch_size}, {args.image_size} px latents, fp32, {device.type} "
          f"({torch.get_num_threads()} threads), {args.rounds} rounds of {K} steps, {args.num_workers} workers\n")
    print("| round | train.py s / step | bare model s / step | ratio |")
    print("|---|---|---|---|")
    for r, (a, b) in enumerate(zip(train_times, bare_times)):
        print(f"| {r + 1} | {a:.3f} | {b:.3f} | {a / b:.3f}× |")
    print(f"| median | | | {statistics.median(a / b for a, b in zip(train_times, bare_times)):.3f}× |")


def bench_fid(args, device):
    """fid.py's feature extraction (images / s) and precision / recall on 20K × 10K features (time, peak memory)."""
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
    print(f"\nfid.py on {device.type} ({torch.get_num_threads()} threads)\n")
    print("| measurement | value |")
    print("|---|---|")
    print(f"| feature extraction, {args.num_images} random {args.image_size}-px images, batch {args.batch_size} | "
          f"{extraction:.2f} images / s |")
    print(f"| precision / recall, 20,000 samples × 10,000 references, 2048-d | {pr_seconds:.1f} s, peak memory "
          f"+{peak_growth:.2f} GiB |")


def bench_sampler(args, device):
    """Each sampler against the network forwards it makes, on the built-in dataset's workload."""
    torch.manual_seed(0)
    shapes = data.ShapesDataset()
    C, H, _ = shapes.input_shape
    model = build_model(args.model, input_size=H, in_channels=C, num_classes=shapes.num_classes).to(device).eval()
    n, K = args.batch_size, args.num_steps
    z = torch.randn(n, C, H, H, device=device)
    y = torch.randint(0, shapes.num_classes, (n,), device=device)
    rand = SampleRandomness(0, range(n))
    guided_steps = sum(1 for k in range(K) if 1 - k / K <= 0.7)

    @torch.no_grad()
    def forwards(count, batch):
        x, labels = torch.cat([z] * (batch // n)), torch.cat([y] * (batch // n))
        for k in range(count):
            model(x, torch.full((batch,), 1 - k / count, device=device), labels)

    def sde(network):
        noise = lambda like: rand.normal(like.shape[1:]).to(like.device)  # noqa: E731
        euler_maruyama_sampler(network, z, y, K, noise=noise)

    null = NullNetwork(shapes.num_classes)
    bare, bare2 = f"{K} forwards, batch {n}", f"{K} forwards, batch {2 * n}"
    runs = {  # name: (what to time, the bare-forward run it is compared with)
        bare: (lambda: forwards(K, n), None),
        f"euler, {K} steps": (lambda: euler_sampler(model, z, y, K), bare),
        "euler loop alone (network stubbed out)": (lambda: euler_sampler(null, z, y, K), bare),
        f"sde, {K} steps, per-sample noise": (lambda: sde(model), bare),
        "sde loop alone (network stubbed out)": (lambda: sde(null), bare),
        bare2: (lambda: forwards(K, 2 * n), None),
        "euler, cfg 4, t in [0, 1]": (lambda: euler_sampler(model, z, y, K, 4.0), bare2),
        f"euler, cfg 4, t in [0, 0.7] ({guided_steps} of {K} steps guided)": (
            lambda: euler_sampler(model, z, y, K, 4.0, (0.0, 0.7)), bare2),
    }
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(args.warmup + args.steps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            runs[name][0]()
            synchronize(device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - start)
    print(f"\n{args.model} on {C}×{H}×{H} inputs, batch {n}, fp32, {device.type} ({torch.get_num_threads()} threads), "
          f"{args.steps} rounds after {args.warmup} warm-up rounds\n")
    print("| run | s (median) | vs its bare forwards (median of per-round ratios) |")
    print("|---|---|---|")
    for name, (_, base) in runs.items():
        ratio = "" if base is None else f"{statistics.median(a / b for a, b in zip(times[name], times[base])):.3f}×"
        print(f"| {name} | {statistics.median(times[name]):.3f} | {ratio} |")


def main(args):
    default_model, default_batch = BENCHMARK_DEFAULTS[args.benchmark]
    args.num_images = args.num_images or {"data": 4096, "fid": 200}.get(args.benchmark)
    args.model = args.model or default_model
    args.batch_size = args.batch_size or default_batch
    if args.benchmark == "data":
        bench_data(args)
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    {"step": bench_step, "sampler": bench_sampler, "train": bench_train, "fid": bench_fid}[args.benchmark](args, device)


if __name__ == "__main__":
    run(main, build_parser().parse_args())
