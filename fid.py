"""FID, sFID, Inception Score, precision and recall as OpenAI's ADM evaluator computes them, in PyTorch.

    python fid.py VIRTUAL_imagenet256_labeled.npz samples/NAME.npz      # ADM evaluator's command shape
    torchrun --nproc_per_node=8 fid.py REF.npz SAMPLES.npz              # feature extraction split over GPUs

REF and SAMPLES may each be an `.npz` with `arr_0` (N, H, W, 3) uint8 (ADM's batches; sample.py writes them) or a
folder of images. A reference that carries `mu, sigma, mu_s, sigma_s` (ADM's do) supplies its FID / sFID statistics,
as in the ADM evaluator; its images still serve precision and recall. Results are printed and saved as JSON (`--out`).

The network is the FID Inception (TensorFlow's 2015-12-05 graph) in torchvision's layout, as pytorch-fid and
torch-fidelity port it, after TensorFlow-1's bilinear resize to 299×299 and (x − 128)/128. Its pool_3 features
serve FID, precision and recall; Mixed_6d's first 7 channels sFID; pool_3 · fc.weightᵀ the Inception Score.
"""
import argparse
import json
import pickle
import sys
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")  # pytorch-fid's port; torch-fidelity hosts the same file


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref", help="reference: an .npz batch or a folder of images")
    parser.add_argument("samples", help="samples: the same kinds")
    parser.add_argument("--inception", default=None,
                        help=f"local copy of the Inception weights (default: downloaded from {INCEPTION_URL})")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (ADM: 64)")
    parser.add_argument("--out", default=None, help="results JSON (default: SAMPLES.fid.json)")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad flags answer here, before the heavy imports below

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models import inception as tv
from tqdm import tqdm

from runtime import UserError, all_gather, close_distributed, init_distributed, run

INCEPTION_SIZE = 299      # the graph resizes every input to 299×299
SPATIAL_CHANNELS = 7      # sFID: the first 7 channels of mixed_6/conv, 17·17·7 = 2023 values
IS_SPLIT_SIZE = 5000      # ADM: Inception Score over contiguous splits of 5000 samples
PR_NEIGHBOURS = 3         # ADM: a point's radius is its distance to its 3rd nearest neighbour
PR_BATCH = 10_000         # ADM: distances in 10000 × 10000 blocks
FD_EPS = 1e-6             # ADM / pytorch-fid: added to both covariances when sqrtm fails
STANDARD_COUNTS = 50_000, 10_000  # ADM's tables: 50K samples against its 10K-image reference batches
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


# ---------------------------------------------------------------- the FID Inception (TF 2015-12-05), torchvision layout

def tf_pool(x, max_pool=False):
    """The pool branch's 3×3 / stride 1 / SAME pooling as the TF graph does it: an average that ignores the zero
    padding, or, in the last block only, a max (a quirk of that graph)."""
    return (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if max_pool
            else F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))


class InceptionA(tv.InceptionA):
    def _forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(tf_pool(x))]


class InceptionC(tv.InceptionC):
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        b7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(b7dbl))
        return [self.branch1x1(x), b7, b7dbl, self.branch_pool(tf_pool(x))]


class InceptionE(tv.InceptionE):
    max_pool = False  # True in Mixed_7c only

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        return [self.branch1x1(x), b3, b3dbl, self.branch_pool(tf_pool(x, self.max_pool))]


class InceptionFeatures(NamedTuple):
    pool: torch.Tensor     # (N, 2048): pool_3
    spatial: torch.Tensor  # (N, 2023): mixed_6/conv, channels 0–6, flattened in (h, w, c) order
    logits: torch.Tensor   # (N, 1008): pool_3 · fc.weightᵀ, without the bias (as ADM's Inception Score)


def tf1_resize_bilinear(x, size):
    """TensorFlow-1's `resize_bilinear` (align_corners=False: no half-pixel centres, no antialiasing): output pixel
    d samples the input at d·(in/out) in float32, between its floor and the next pixel (clamped), along x, then y,
    in TF's order of operations. x: (N, C, H, W) → (N, C, size, size), channels-last (fastest for the convolutions)."""
    def axis(n_in):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size)
        lo = src.floor().long()
        return lo, (lo + 1).clamp(max=n_in - 1), src - lo  # (size,) each
    nhwc = x.permute(0, 2, 3, 1).contiguous()                                   # (N, H, W, C)
    (y0, y1, dy), (x0, x1, dx) = axis(nhwc.shape[1]), axis(nhwc.shape[2])
    # Along x once per source row, then rows y0[d], y1[d] along y: TF's ops (tl + (tr − tl)·dx, …), half the gathers
    left = nhwc.index_select(2, x0)
    rows = left + (nhwc.index_select(2, x1) - left) * dx[:, None]              # (N, H, size, C)
    top, bottom = rows.index_select(1, y0), rows.index_select(1, y1)            # (N, size, size, C)
    return (top + (bottom - top) * dy[:, None, None]).permute(0, 3, 1, 2)      # (N, C, size, size)


class FIDInception(tv.Inception3):  # the layout of pt_inception-2015-12-05-6726825d.pth
    def __init__(self):
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False,
                         inception_blocks=[tv.BasicConv2d, InceptionA, tv.InceptionB, InceptionC, tv.InceptionD,
                                           InceptionE, tv.InceptionAux])
        self.Mixed_7c.max_pool = True

    def forward(self, images):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = tf1_resize_bilinear(images.float(), INCEPTION_SIZE).sub_(128).div_(128)  # (N, 3, 299, 299)
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))  # (N, 64, 73, 73)
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))                      # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d):
            x = block(x)                                                                   # (N, 768, 17, 17)
        spatial = x[:, :SPATIAL_CHANNELS]  # TF's mixed_6/conv: Mixed_6d's 1×1 branch (post-ReLU), concatenated first
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)                                                                   # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))                                                          # (N, 2048)
        return InceptionFeatures(pool, spatial.permute(0, 2, 3, 1).flatten(1), pool @ self.fc.weight.T)


def load_inception(path=None, device="cpu"):
    """The FID Inception with its weights from `path`, or downloaded once into torch's hub cache."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]
    if path is None and not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, str(cached), hash_prefix="6726825d", progress=True)
        except (OSError, RuntimeError) as e:  # no network, or a file whose hash does not match
            raise UserError(f"could not download the FID Inception weights from {INCEPTION_URL} ({e}); download it "
                            f"elsewhere and pass it as --inception PATH") from None
    path = Path(path or cached)
    if not path.is_file():
        raise UserError(f"--inception {path} does not exist (the weights are at {INCEPTION_URL})")
    model = FIDInception()
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (pickle.UnpicklingError, EOFError, RuntimeError, TypeError):  # not a weight file, or other weights
        raise UserError(f"{path} is not the FID Inception's weights (expected the state dict "
                        f"{INCEPTION_URL})") from None
    return model.eval().requires_grad_(False).to(device)


class Source(NamedTuple):  # one input
    count: int
    batches: object       # batches(start, stop, size) → iterator of uint8 (n, H, W, 3) arrays, or None
    stats: dict           # mu, sigma, mu_s, sigma_s when the file carries them, else {}


def open_source(path):
    """An .npz batch (ADM's or sample.py's) or a folder of images."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")

        def folder_batches(start, stop, size):
            for lo in range(start, stop, size):
                arrays = [np.asarray(Image.open(p).convert("RGB")) for p in files[lo:min(stop, lo + size)]]
                if len({a.shape for a in arrays}) > 1:
                    raise UserError(f"{path}: images of different sizes ({sorted({a.shape for a in arrays})})")
                yield np.stack(arrays)

        return Source(len(files), folder_batches, {})
    if not path.is_file():
        raise UserError(f"{path} is neither an .npz file nor a folder of images")
    try:
        npz = np.load(path)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable .npz file: {e}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise UserError(f"{path} is a bare .npy array, not an .npz with arr_0")
    stats = {k: npz[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in npz.files}
    if stats and len(stats) != 4:
        raise UserError(f"{path} carries only {sorted(stats)} of mu, sigma, mu_s, sigma_s")
    if "arr_0" not in npz.files:
        raise UserError(f"{path} has no images (arr_0); keys: {npz.files}")
    # The images are streamed from the zip, so that 50K of them never sit in memory.
    with npz.zip.open("arr_0.npy") as f:
        fmt = np.lib.format  # .npy 1.0, or 2.0 / 3.0 (long or UTF-8 headers), which share 2.0's header layout
        read_header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3:
        raise UserError(f"{path}: arr_0 must be uint8 images of shape (N, H, W, 3), got {dtype} {shape}")
    image_bytes = shape[1] * shape[2] * 3

    def npz_batches(start, stop, size):
        with npz.zip.open("arr_0.npy") as f:  # one pass, front to back: zip members seek forward by reading
            f.seek(offset + start * image_bytes)
            for lo in range(start, stop, size):
                n = min(stop, lo + size) - lo
                try:
                    data = f.read(n * image_bytes)
                except zipfile.BadZipFile as e:  # a failed CRC check at the member's end
                    raise UserError(f"{path}: arr_0 is corrupt or truncated ({e})") from None
                if len(data) != n * image_bytes:
                    raise UserError(f"{path}: arr_0 is truncated (images from {lo} on of {shape[0]})")
                yield np.frombuffer(data, dtype=np.uint8).reshape(n, *shape[1:])

    return Source(shape[0], npz_batches, stats)


@torch.no_grad()
def extract_features(model, source, batch_size, rank=0, world_size=1, desc="features"):
    """InceptionFeatures of every image of `source` as numpy arrays, in order; each rank runs a contiguous slice."""
    device = next(model.parameters()).device
    start, stop = rank * source.count // world_size, (rank + 1) * source.count // world_size
    parts = []
    for batch in tqdm(source.batches(start, stop, batch_size), total=len(range(start, stop, batch_size)),
                      desc=desc, disable=rank != 0):
        images = torch.from_numpy(np.array(batch)).to(device).permute(0, 3, 1, 2)  # (n, 3, H, W), a copy
        parts.append([f.cpu().numpy() for f in model(images)])
    parts = [part for rank_parts in all_gather(parts, world_size) for part in rank_parts]  # every rank's, in order
    return InceptionFeatures(*(np.concatenate(columns) for columns in zip(*parts)))


# ---------------------------------------------------------------- metrics

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=FD_EPS):
    """d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) (Heusel et al. 2017), computed as ADM / pytorch-fid do: when
    sqrtm(Σ₁Σ₂) is not finite, eps·I is added to both covariances; an imaginary part is dropped when its diagonal
    is below 1e-3, and is an error otherwise."""
    mu1, mu2, sigma1, sigma2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} and {mu2.shape}")
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"sqrtm(Σ₁Σ₂) is singular; adding {eps} to the diagonal of both covariances")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(Σ₁Σ₂) has an imaginary component of {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=IS_SPLIT_SIZE):
    """IS = exp(E_x KL(p(y|x) ‖ p(y))) on contiguous splits of `split_size` samples, averaged (ADM, improved-gan).
    logits: (N, 1008). The softmax and the logarithms run in float32, as in the ADM evaluator."""
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=1).numpy()
    scores = []
    for p in np.split(probs, range(split_size, len(probs), split_size)):  # (split_size, 1008) each
        kl = p * (np.log(p) - np.log(np.mean(p, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def squared_distances(a, b):
    """‖a_i − b_j‖² (m, n) with the roundings of ADM's DistanceBlock on float16 features: the features, squares,
    norms ‖a‖² = Σ a², dot products a·b (summed in float32, as TF's float16 matmul), ‖a‖² − 2a·b and + ‖b‖² are each
    rounded to float16, then clamped at 0; the block is redone in float32 if an entry overflows (TF's tf.cond).
    Deviation: TF adds a norm's float16 terms in float16, in its kernel's order (CUB's tree on a GPU); we add them
    in float32 and round once, so a norm can still differ from the evaluator's by a float16 step."""
    a16, b16 = a.half(), b.half()
    na, nb = (a16 * a16).float().sum(1).half(), (b16 * b16).float().sum(1).half()  # (m,), (n,): float16 squares
    dot = (a16.float() @ b16.float().T).half()                                      # (m, n)
    d = (na[:, None] - 2 * dot + nb[None, :]).clamp(min=0)              # float16 arithmetic, as the TF graph
    if torch.isfinite(d).all():
        return d.float()
    na, nb = (a ** 2).sum(1), (b ** 2).sum(1)
    return (na[:, None] - 2 * a @ b.T + nb[None, :]).clamp(min=0)


def manifold_radii(x, k=PR_NEIGHBOURS, batch=PR_BATCH):
    """Each point's squared distance to its k-th nearest other point: the (k+1)-th smallest, itself included. x: (N, D)
    float32, in blocks of `batch` × `batch` (memory ~ batch²), keeping the k + 1 smallest per row of each block."""
    radii = []
    for rows in x.split(batch):
        smallest = torch.cat([squared_distances(rows, cols).topk(min(k + 1, len(cols)), dim=1, largest=False).values
                              for cols in x.split(batch)], dim=1)                   # (rows, ≤ (k + 1) per block)
        radii.append(smallest.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def covered(points, centres, radii, batch=PR_BATCH):
    """For each point: is it within the radius (≤) of at least one centre? (n,) bool, in blocks as manifold_radii."""
    inside = []
    for rows in points.split(batch):
        hits = [(squared_distances(rows, cols) <= r).any(dim=1)
                for cols, r in zip(centres.split(batch), radii.split(batch))]
        inside.append(torch.stack(hits).any(dim=0))
    return torch.cat(inside)


def precision_recall(ref_features, sample_features, k=PR_NEIGHBOURS, batch=PR_BATCH):
    """Kynkäänniemi et al. (2019) as ADM estimates them: precision = the fraction of samples inside the reference
    manifold (the union of balls around reference points, radius = k-NN distance), recall = the reverse."""
    ref, samples = (torch.as_tensor(f, dtype=torch.float32) for f in (ref_features, sample_features))
    precision = covered(samples, ref, manifold_radii(ref, k, batch), batch).float().mean().item()
    recall = covered(ref, samples, manifold_radii(samples, k, batch), batch).float().mean().item()
    return precision, recall


def statistics_of(source, features):
    """FID and sFID statistics: those the file carries (ADM), else the means (in the features' float32, as ADM) and
    the unbiased covariances (float64) of the pool and spatial features."""
    if source.stats:
        return source.stats
    return {"mu": features.pool.mean(axis=0), "sigma": np.cov(features.pool, rowvar=False),
            "mu_s": features.spatial.mean(axis=0), "sigma_s": np.cov(features.spatial, rowvar=False)}


def adm_metrics(ref, ref_features, samples, sample_features):
    """IS, FID, sFID, precision and recall of the samples against the reference (Sources and their features)."""
    ref_stats, sample_stats = statistics_of(ref, ref_features), statistics_of(samples, sample_features)
    precision, recall = precision_recall(ref_features.pool, sample_features.pool)
    return {"inception_score": inception_score(sample_features.logits),
            "fid": frechet_distance(sample_stats["mu"], sample_stats["sigma"], ref_stats["mu"], ref_stats["sigma"]),
            "sfid": frechet_distance(sample_stats["mu_s"], sample_stats["sigma_s"], ref_stats["mu_s"],
                                     ref_stats["sigma_s"]),
            "precision": precision, "recall": recall}


def main(args):
    # The inputs are checked before any weights are loaded (or downloaded).
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    ref, samples = open_source(args.ref), open_source(args.samples)
    for path, source in ((args.ref, ref), (args.samples, samples)):
        if source.count < PR_NEIGHBOURS + 1:
            raise UserError(f"{path} holds {source.count} image(s): precision and recall need at least "
                            f"{PR_NEIGHBOURS + 1} in each set (a point and its {PR_NEIGHBOURS} nearest neighbours)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # reference-grade features
    rank, world_size, device = init_distributed()
    model = load_inception(args.inception, device)
    ref_features = extract_features(model, ref, args.batch_size, rank, world_size, "reference")
    sample_features = extract_features(model, samples, args.batch_size, rank, world_size, "samples")
    if rank == 0:
        results = {**adm_metrics(ref, ref_features, samples, sample_features),
                   "reference": str(Path(args.ref).resolve()), "samples": str(Path(args.samples).resolve()),
                   "num_reference": len(ref_features.pool), "num_samples": len(sample_features.pool)}
        if samples.count < STANDARD_COUNTS[0] or ref.count < STANDARD_COUNTS[1]:
            print(f"warning: {samples.count} samples against {ref.count} reference images are not comparable with "
                  f"published numbers ({STANDARD_COUNTS[0]} against {STANDARD_COUNTS[1]}): FID is biased upwards "
                  f"at small N", file=sys.stderr)
        for name in ("inception_score", "fid", "sfid", "precision", "recall"):
            print(f"{name}: {results[name]}")
        out = Path(args.out or f"{str(args.samples).rstrip('/')}.fid.json")
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"saved {out}")
    close_distributed()


if __name__ == "__main__":
    run(main, build_parser().parse_args())
