"""Block-similarity heatmaps, the paper's lens on representation diversity (Sec. 2, Appendices C and E).

    python analysis.py --ckpt results/000-SiT-B-2-sit/checkpoints/0050000.pt --ckpt …/0400000.pt

For each checkpoint, the outputs of all L blocks are taken on one batch fixed by --seed (labels and noise, the
same for every checkpoint) along an unguided 50-step Euler sampling trajectory: at its last step (t = 0.02, the
paper's Fig. 2) or, with --t, wherever it reaches the given times (Fig. A2). Their L×L similarities are drawn as
PNG heatmaps (one per metric and time, checkpoints side by side) and written to JSON with the mean off-diagonal
similarity and L_div's three terms.

Metrics: CKA with an RBF kernel (the paper's; bandwidth by the median heuristic, which the paper does not give),
linear CKA, and the mean |per-token cosine| between blocks (the diversity loss's L_MI penalises the absolute value
of the mean cosine instead, which cancels opposite signs). For CKA, each sample's block output (T, D) is flattened
into one vector, so the kernels are N×N over the batch.
"""
import argparse
import itertools
import json
from pathlib import Path

METRIC_NAMES = {"cka_rbf": "RBF CKA", "cka_linear": "linear CKA", "cosine": "mean |token cosine|"}
METRICS = tuple(METRIC_NAMES)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", action="append", required=True, help="a checkpoint; repeat to compare several")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema",
                        help="which weights of a training checkpoint (a short run's EMA is still near the initial one)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS))
    parser.add_argument("--num-samples", type=int, default=64, help="batch the similarities are measured on")
    parser.add_argument("--seed", type=int, default=0, help="labels and noise (identical for every checkpoint)")
    parser.add_argument("--t", type=float, nargs="+", default=[1 / 50],
                        help="trajectory times, rounded to its grid k/50 (default: its last step, 0.02)")
    parser.add_argument("--out", default="analysis", help="folder for the PNGs and similarity.json")
    parser.add_argument("--device", default=None)
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad flags answer here, before the heavy imports below

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from losses import DIVERSITY_LAYERS, diversity_loss, diversity_pairs
from runtime import UserError, run
from sample import SampleRandomness, load_sampling_model

TRAJECTORY_STEPS = 50  # the Euler trajectory the features are taken along (the paper: its last step)
COLOUR_RANGE = (0.0, 1.0)  # every metric lies in [0, 1]: one fixed scale, so pictures drawn apart compare by eye
# A perceptually ordered colour map (viridis at five stops), interpolated linearly in between.
COLOURS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def hsic(K, L):
    """HSIC(K, L) = Tr(K H L H) / (n − 1)² with H = I − 11ᵀ/n (Gretton et al. 2005), K and L (n, n)."""
    HKH = K - K.mean(dim=0, keepdim=True) - K.mean(dim=1, keepdim=True) + K.mean()  # the centred features' kernel
    return (HKH * L).sum() / (K.shape[0] - 1) ** 2


def rbf_kernel(X):
    """exp(−‖x_i − x_j‖² / (2σ²)) with σ² the median of all n² squared distances (median heuristic, as Kornblith
    et al.'s CKA code with threshold 1: the zero diagonal included, the two middle values averaged). X: (n, d)."""
    sq = torch.cdist(X, X).pow(2)                                           # (n, n)
    return torch.exp(-sq / (2 * torch.quantile(sq.flatten(), 0.5)))


def cka(X, Y, kernel="rbf"):
    """CKA(X, Y) = HSIC(K, L) / √(HSIC(K, K)·HSIC(L, L)) (Kornblith et al. 2019). X: (n, d₁), Y: (n, d₂)."""
    X, Y = X.double(), Y.double()
    K, L = (rbf_kernel(X), rbf_kernel(Y)) if kernel == "rbf" else (X @ X.T, Y @ Y.T)
    return (hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L))).item()


def mean_abs_token_cosine(a, b):
    """mean over (n, t) of |cos(a[n, t], b[n, t])|: the per-token similarity L_MI penalises. a, b: (N, T, D)."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).abs().mean().item()


def similarity_matrix(blocks, metric):
    """(L, L) similarities between all block outputs, each (N, T, D)."""
    matrix = np.eye(len(blocks))
    for (i, a), (j, b) in itertools.combinations(enumerate(blocks), 2):
        matrix[i, j] = matrix[j, i] = (mean_abs_token_cosine(a, b) if metric == "cosine"
                                       else cka(a.flatten(1), b.flatten(1), metric.removeprefix("cka_")))
    return matrix


def mean_off_diagonal(matrix):
    return float(matrix[~np.eye(len(matrix), dtype=bool)].mean())


@torch.no_grad()
def trajectory_features(model, z, y, steps, num_steps=TRAJECTORY_STEPS):
    """{k: the blocks' outputs L × (N, T, D)} at each step k of `steps` (k = 1 … num_steps counting down from t = 1,
    t = k/num_steps) of an unguided Euler trajectory from z at t = 1 on sample.euler_sampler's grid: at step k, the
    state reached after num_steps − k steps. z: (N, C, H, W) noise; y: (N,) labels."""
    t_steps = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    x, features = z.double(), {}
    for i, k in enumerate(range(num_steps, min(steps) - 1, -1)):  # i steps taken, at t = t_steps[i] = k/num_steps
        t = torch.full((len(x),), float(t_steps[i]), device=x.device)  # MeanFlow models at r = t: u(x, t, t) = v
        v = model(x.float(), t, y, return_features=k in steps, r=t if model.meanflow else None)
        if k in steps:
            v, features[k] = v[0], v[1].blocks
        x = x + (t_steps[i + 1] - t_steps[i]) * v.double()
    return features


def colour(values, low, high):  # (…, 3) uint8: COLOURS's stops evenly over [low, high], values outside clipped
    stops = np.linspace(low, high, len(COLOURS))
    return np.round(np.stack([np.interp(values, stops, channel) for channel in COLOURS.T], axis=-1)).astype(np.uint8)


def heatmap(matrix, title, low, high, cell=16):
    """One PIL image: a title of up to two lines, the matrix (block 0 at the top left), block indices, a colour bar."""
    font = ImageFont.load_default()
    margin, top, bar, size = 28, 36, 14, len(matrix) * cell
    width = max(margin + size + 12 + bar + 40, 8 + round(max(font.getlength(line) for line in title.split("\n"))))
    image = Image.new("RGB", (width, top + size + 24), "white")
    cells = colour(matrix, low, high).repeat(cell, axis=0).repeat(cell, axis=1)  # (size, size, 3)
    image.paste(Image.fromarray(cells), (margin, top))
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), title, fill="black", font=font)
    for k in range(0, len(matrix), max(1, len(matrix) // 8)):
        draw.text((margin + k * cell + 2, top + size + 4), str(k), fill="black", font=font)
        draw.text((4, top + k * cell + 2), str(k), fill="black", font=font)
    ramp = colour(np.linspace(high, low, size)[:, None].repeat(bar, axis=1), low, high)
    x_bar = margin + size + 12
    image.paste(Image.fromarray(ramp), (x_bar, top))
    draw.text((x_bar + bar + 3, top - 2), f"{high:.2f}", fill="black", font=font)
    draw.text((x_bar + bar + 3, top + size - 10), f"{low:.2f}", fill="black", font=font)
    return image


def measured_on(where):
    """Where the features of a `features` key ("t=0.02") were taken, in words."""
    return f"at {where} of a {TRAJECTORY_STEPS}-step Euler trajectory"


def analyse(ckpt_path, args, device):
    """{"step": the checkpoint's step or None, "model", "weights", "features": {where: {metric: (L, L) nested list,
    "mean_off_diagonal": {metric: value}, "diversity": L_div and its three terms}}}."""
    print(f"  loading its {args.weights} weights", flush=True)
    model, description = load_sampling_model(ckpt_path, args.weights)
    model.to(device)
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)  # a dict: load_sampling_model
    step, trained = saved.get("steps"), saved.get("args", {})
    # the run's own pairs P (train.block_losses_for): its first REPA block and its layer count
    pairs = diversity_pairs(model.depth, (trained.get("encoder_depth") or [None])[0],
                            trained.get("diversity_layers", DIVERSITY_LAYERS))
    rand = SampleRandomness(args.seed, range(args.num_samples))  # the same for every checkpoint of one shape
    y = rand.labels(model.num_classes).to(device)
    z = rand.normal((model.in_channels, model.input_size, model.input_size)).float().to(device)
    print(f"  block features on {args.num_samples} samples", flush=True)
    features = trajectory_features(model, z, y, {round(t * TRAJECTORY_STEPS) for t in args.t})  # k: t = k/50
    result = {"step": step, "model": description["model"], "weights": args.weights, "features": {}}
    for k, blocks in features.items():
        where = f"t={k / TRAJECTORY_STEPS:g}"
        print(f"  {', '.join(METRIC_NAMES[m] for m in args.metrics)} between {len(blocks)} blocks "
              f"{measured_on(where)}", flush=True)
        matrices = {metric: similarity_matrix(blocks, metric) for metric in args.metrics}
        result["features"][where] = {
            **{metric: matrix.tolist() for metric, matrix in matrices.items()},
            "mean_off_diagonal": {metric: mean_off_diagonal(matrix) for metric, matrix in matrices.items()},
            "diversity": {term: value.item() for term, value in diversity_loss(blocks, pairs)._asdict().items()}}
    return result


def main(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not all(1 <= round(t * TRAJECTORY_STEPS) <= TRAJECTORY_STEPS for t in args.t):
        raise UserError(f"--t must lie in [0.01, 1] (the trajectory's steps t = k/{TRAJECTORY_STEPS}), got {args.t}")
    if args.num_samples < 2:
        raise UserError("--num-samples must be at least 2: similarities compare samples")
    results = {}
    for k, path in enumerate(args.ckpt, 1):
        print(f"[{k}/{len(args.ckpt)}] {path}", flush=True)
        results[str(path)] = analyse(path, args, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for where, metric in itertools.product(next(iter(results.values()))["features"], args.metrics):
        images = []
        for path, r in results.items():
            path = Path(path)  # results/NNN-…/checkpoints/0000600.pt is labelled by its run, NNN-…
            label = path.parent.parent.name if path.parent.name == "checkpoints" else path.name
            images.append(heatmap(np.array(r["features"][where][metric]), f"{METRIC_NAMES[metric]} "
                                  f"{measured_on(where)}\n{label}, step {r['step']}, {args.weights} weights",
                                  *COLOUR_RANGE))
        canvas = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
        for k, image in enumerate(images):  # side by side
            canvas.paste(image, (sum(i.width for i in images[:k]), 0))
        name = f"{metric}-{where.replace('=', '')}.png"
        canvas.save(out / name)
        print(f"saved {out / name}")
    (out / "similarity.json").write_text(json.dumps(results, indent=1) + "\n")
    for path, r in results.items():
        for where, entry in r["features"].items():
            summary = ", ".join(f"{m} {v:.3f}" for m, v in entry["mean_off_diagonal"].items())
            print(f"{path} (step {r['step']}, {where}): mean off-diagonal {summary}; "
                  f"L_div {entry['diversity']['total']:.4f}")
    print(f"saved {out / 'similarity.json'}")


if __name__ == "__main__":
    run(main, build_parser().parse_args())
