"""Training data: ImageNet-style folders turned into SD-VAE latent sets, and a built-in set for CPU runs.

Preparing (once, on one or several GPUs of one machine; re-running continues where it stopped):

    python data.py --data-path /imagenet/train --out data/in256 --image-size 256
    torchrun --nproc_per_node=8 data.py --data-path /imagenet/train --out data/in256 --image-size 256

turns a folder of class folders into a prepared folder of a few memory-mapped arrays:

    dataset.json  what was prepared and how (image size, VAE weights, class names, …)
    files.txt     the source images, one relative path per line; line i is image i
    labels.npy    (N,) int64       class index = position of the class folder in sorted order
    moments.npy   (N, 8, h, w)     float32: the VAE posterior's mean (4 channels) and std (4 channels), h = S/8
    images.npy    (N, 3, S, S)     uint8: the center-cropped images (kept unless --no-images; REPA's encoder reads them)
    status.npy    (N,) uint8       0 pending, 1 done, 2 skipped (unreadable)

Both datasets serve (x, y) or, with `images=True`, (x, y, image uint8 (3, S, S)). For a prepared folder x is the
moments (`vae.sample_latents` draws a fresh latent from them each step, as REPA); for the built-in ShapesDataset
x is the image itself in [-1, 1] (pixel space, no VAE).
"""
import argparse
import errno
import functools
import hashlib
import json
import math
import os
from datetime import timedelta
from pathlib import Path


def build_parser():
    parser = argparse.ArgumentParser(description="Encode an ImageNet-style folder into SD-VAE latent moments.")
    parser.add_argument("--data-path", required=True, help="a folder of class folders of images (ImageNet train)")
    parser.add_argument("--out", required=True, help="the prepared folder; re-running continues it")
    parser.add_argument("--image-size", type=int, default=256, help="256 or 512 in the papers; any multiple of 8")
    parser.add_argument("--vae", default="mse",  # REPA's preprocessing; ema and mse share one encoder
                        help="'ema' or 'mse' (downloaded from Hugging Face), or a local weight file or folder")
    parser.add_argument("--images", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the center-cropped images (REPA's encoder needs them; 3·S·S bytes each)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per VAE forward, per GPU")
    parser.add_argument("--num-workers", type=int, default=8, help="DataLoader workers decoding JPEGs, per GPU")
    parser.add_argument("--bf16", action="store_true", help="encode under bf16 autocast (faster; float32 by default)")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad flags answer here, before the heavy imports below

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from tqdm import tqdm

from runtime import (UserError, barrier, close_distributed, git_commit, init_distributed, replace_atomically, run,
                     temporary_path)
from vae import DOWNSAMPLING, LATENT_CHANNELS, LATENT_SCALE, encode_images, file_sha256, load_vae, vae_weights_path

FORMAT_VERSION = 1
PENDING, DONE, SKIPPED = 0, 1, 2  # status.npy
NAMES = METADATA, FILES, LABELS, MOMENTS, IMAGES, STATUS = (
    "dataset.json", "files.txt", "labels.npy", "moments.npy", "images.npy", "status.npy")
# What must agree for a re-run to continue a folder instead of being refused.
CONFIGURATION = ("format", "image_size", "images", "batch_size", "bf16", "num_images", "files_sha256", "vae_sha256")


def center_crop_arr(pil_image, image_size):
    """ADM's preprocessing (guided-diffusion, used by DiT, SiT and REPA) → (S, S, 3) uint8: box-filter halvings while
    the shorter side is ≥ 2S, a bicubic resize of the shorter side to S, then the central S×S crop."""
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


# ---------------------------------------------------------------- a prepared folder, for training

def read_metadata(path):
    path = Path(path)
    if not (path / METADATA).is_file():
        raise UserError(f"{path} is not a prepared dataset (no {METADATA}); prepare one with "
                        f"`python data.py --data-path IMAGENET/train --out {path}`")
    return json.loads((path / METADATA).read_text())


class PreparedDataset(Dataset):
    """A folder written by `python data.py`, less the images skipped as unreadable. The arrays are memory-mapped in
    each DataLoader worker on first use, so that workers share the page cache instead of copies."""

    latent = True  # x holds VAE posterior moments: train on vae.sample_latents(x)

    def __init__(self, path, images=False):
        self.path = Path(path)
        meta = read_metadata(self.path)
        if meta["format"] != FORMAT_VERSION:
            raise UserError(f"{self.path} has format {meta['format']}; this code reads format {FORMAT_VERSION}")
        status = np.load(self.path / STATUS)
        if (status == PENDING).any():
            raise UserError(f"{self.path} is only partly prepared ({(status != PENDING).sum()} of {len(status)} "
                            f"images): re-run the command that prepared it to finish")
        if images and not meta["images"]:
            raise UserError(f"{self.path} was prepared with --no-images, but images are needed (REPA's encoder "
                            f"reads them): prepare it again without --no-images")
        self.indices, self.labels = np.flatnonzero(status == DONE), np.load(self.path / LABELS)
        self.images, self.classes, self.image_size = images, meta["classes"], meta["image_size"]
        self.num_classes, h = len(self.classes), self.image_size // DOWNSAMPLING
        self.input_shape = (LATENT_CHANNELS, h, h)  # what the model sees
        self._arrays = None

    def __getstate__(self):  # workers re-open the memory maps instead of receiving their contents
        return {**self.__dict__, "_arrays": None}

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        if self._arrays is None:
            names = (MOMENTS, IMAGES) if self.images else (MOMENTS,)
            self._arrays = [np.load(self.path / name, mmap_mode="r") for name in names]
        j = self.indices[i]
        moments, *image = [torch.from_numpy(np.array(array[j])) for array in self._arrays]  # image if self.images
        return (moments, int(self.labels[j]), *image)


# ---------------------------------------------------------------- the built-in dataset: coloured shapes, no download

def shape_distance(shape, u, v, s):
    """Signed distance (pixels, negative inside) to shape `shape` of radius s at u = v = 0 (v grows downwards)."""
    def box(a, b):  # an axis-aligned rectangle of half-sides a × b
        return np.maximum(np.abs(u) - a, np.abs(v) - b)

    r = np.hypot(u, v)
    distances = [lambda: r - s,                                                              # disk
                 lambda: box(0.8 * s, 0.8 * s),                                              # square
                 lambda: (np.abs(u) + np.abs(v) - s) / math.sqrt(2),                         # diamond
                 lambda: np.maximum(v - s / 2, (math.sqrt(3) * np.abs(u) - v) / 2 - s / 2),  # triangle, apex up
                 lambda: np.abs(r - 0.75 * s) - 0.25 * s,                                    # ring
                 lambda: np.minimum(box(s, 0.3 * s), box(0.3 * s, s)),                       # plus
                 lambda: shape_distance(5, (u + v) / math.sqrt(2), (u - v) / math.sqrt(2), s),  # cross: the plus at 45°
                 lambda: np.maximum(box(0.85 * s, 0.85 * s), -box(0.5 * s, 0.5 * s)),        # square frame
                 lambda: box(s, 0.35 * s),                                                   # horizontal bar
                 lambda: box(0.35 * s, s)]                                                   # vertical bar
    if not 0 <= shape < len(distances):
        raise ValueError(f"no shape number {shape}")
    return distances[shape]()


def render_shape(shape, image_size, rng):
    """One (S, S, 3) uint8 image: shape `shape` with a random centre, size and colours on a plain background."""
    S = image_size
    centre = rng.uniform(0.35 * S, 0.65 * S, size=2)
    radius = rng.uniform(0.2 * S, 0.32 * S)
    background, foreground = rng.uniform(0.0, 0.45, size=3), rng.uniform(0.55, 1.0, size=3)
    coords = np.arange(S) + 0.5                                     # pixel centres
    u, v = coords[None, :] - centre[0], coords[:, None] - centre[1]  # (1, S), (S, 1): x right, y down
    alpha = np.clip(0.5 - shape_distance(shape, u, v, radius), 0.0, 1.0)[..., None]  # (S, S, 1), 1-pixel edge
    image = background + alpha * (foreground - background)         # (S, S, 3) in [0, 1]
    return np.round(image * 255).astype(np.uint8)


class ShapesDataset(Dataset):
    """10 classes of coloured shapes (disk, square, diamond, triangle, ring, plus, cross, frame, two bars). Image i
    has label i mod 10, drawn from a generator seeded with (seed, i): the same images in every process, no disk."""

    latent = False
    num_classes = 10

    def __init__(self, num_images=10_000, image_size=32, seed=0, images=False):
        self.num_images, self.image_size, self.seed, self.images = num_images, image_size, seed, images
        self.input_shape = (3, image_size, image_size)

    def __len__(self):
        return self.num_images

    def __getitem__(self, i):
        if not 0 <= i < self.num_images:
            raise IndexError(f"image {i} of a dataset of {self.num_images}")
        y = i % self.num_classes
        image = torch.from_numpy(render_shape(y, self.image_size, np.random.default_rng([self.seed, i])))
        image = image.permute(2, 0, 1).contiguous()  # (3, S, S) uint8
        x = image.float() / 127.5 - 1.0              # the VAE's input range, [-1, 1]
        return (x, y, image) if self.images else (x, y)


@functools.cache  # trained once per process and size (sample.py, evaluate.py ask for it per batch)
def shapes_classifier(image_size, seed=0, steps=200, num_images=2000, batch_size=64):
    """A small CNN, trained here in seconds on a CPU, that names the shape in a ShapesDataset image ((N, 3, S, S) in
    [-1, 1] → (N, 10) logits): the built-in data's counterpart of ImageNet's Inception classifier, to tell whether a
    sample shows its class. About 99% right on images of another seed at 16 and 32 px (the tests check ≥ 95%)."""
    shapes = ShapesDataset(num_images, image_size, seed=seed)
    x = torch.stack([shapes[i][0] for i in range(num_images)])  # (N, 3, S, S)
    y = torch.arange(num_images) % shapes.num_classes             # ShapesDataset's labels
    with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's random state
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (N, 16, S/2, S/2)
                            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 32, S/4, S/4)
                            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                            nn.Flatten(),  # not average-pooled: 93% → 99% held-out accuracy at 32 px
                            nn.Linear(32 * (image_size // 4) ** 2, shapes.num_classes))
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(steps):
            i = torch.randint(num_images, (batch_size,))
            loss = F.cross_entropy(net(x[i]), y[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval().requires_grad_(False)


BUILTIN_DATA = "builtin:shapes"  # the --data-path that names ShapesDataset (pixel space, no VAE)


class InfiniteSampler(Sampler):
    """This rank's sample indices, endlessly, from global batch `start` on (as edm2's sampler takes a start index).
    Each epoch is a seeded shuffle cut to whole global batches and dealt round-robin over the ranks: a run resumed at
    the steps already trained sees exactly the data an uninterrupted one would, on any number of processes."""

    def __init__(self, num_samples, local_batch, rank, world_size, seed, start=0):
        self.num_samples, self.local_batch, self.rank, self.world_size, self.seed, self.start = (
            num_samples, local_batch, rank, world_size, seed, start)

    def __iter__(self):
        per_epoch = self.num_samples // (self.local_batch * self.world_size)  # global batches
        epoch, batch = divmod(self.start, per_epoch)
        while True:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
            mine = order[:per_epoch * self.local_batch * self.world_size][self.rank::self.world_size]
            yield from mine[batch * self.local_batch:].tolist()
            epoch, batch = epoch + 1, 0


def open_dataset(data_path, images=False, builtin_num_images=10_000, builtin_image_size=32, seed=0):
    """ShapesDataset for BUILTIN_DATA, else the PreparedDataset at `data_path` (with images for REPA's encoder)."""
    if data_path == BUILTIN_DATA:
        return ShapesDataset(builtin_num_images, builtin_image_size, seed=seed, images=images)
    return PreparedDataset(data_path, images=images)


# ---------------------------------------------------------------- preparing a folder of images

def list_image_folder(root):
    """(relative paths, labels, class names) of an ImageNet-style tree, in torchvision ImageFolder's order."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data-path {root} is not a folder")
    try:
        classes, class_to_idx = find_classes(root)  # sorted sub-folder names
        samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise UserError(f"--data-path {root}: {e}") from None
    files = [os.path.relpath(path, root) for path, _ in samples]
    return files, np.array([label for _, label in samples], dtype=np.int64), classes


class ImageFiles(Dataset):
    """(index, center-cropped image (3, S, S) uint8, error message or "") — decoded in DataLoader workers."""

    def __init__(self, root, files, image_size):
        self.root, self.files, self.image_size = Path(root), files, image_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.root / self.files[i]) as image:
                array = center_crop_arr(image.convert("RGB"), self.image_size)
            return i, torch.from_numpy(array).permute(2, 0, 1).contiguous(), ""
        except Exception as e:  # whatever stops one file from decoding (PIL raises many kinds) skips that file only
            return i, torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), f"{type(e).__name__}: {e}"


def start_or_continue(out, meta, files, labels):
    """Create the prepared folder's arrays, or check that an existing folder was started with the same settings."""
    if (out / METADATA).is_file():
        old = read_metadata(out)
        changed = [f"{key}: {old.get(key)!r} there, {meta[key]!r} now" for key in CONFIGURATION
                   if old.get(key) != meta[key]]
        if changed:
            raise UserError(f"{out} holds a dataset prepared with other settings ({'; '.join(changed)}); "
                            f"choose another --out or delete it")
        return
    ours = {*NAMES, *(temporary_path(out / name).name for name in NAMES)}
    if out.exists() and not {p.name for p in out.iterdir()} <= ours:  # our own leftovers are recreated
        raise UserError(f"--out {out} exists and is not a prepared dataset; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    N, S, h = len(files), meta["image_size"], meta["image_size"] // DOWNSAMPLING
    try:
        with replace_atomically(out / FILES) as tmp:
            tmp.write_text("".join(f"{name}\n" for name in files))
        for name, array in ((LABELS, labels), (STATUS, np.zeros(N, dtype=np.uint8))):
            with replace_atomically(out / name) as tmp, open(tmp, "wb") as f:  # np.save would add .npy to a name
                np.save(f, array)
        # Sparse files of the final size, filled in place chunk by chunk (write_rows).
        for name, dtype, shape in [(MOMENTS, np.float32, (N, 2 * LATENT_CHANNELS, h, h)),
                                   (IMAGES, np.uint8, (N, 3, S, S))][:2 if meta["images"] else 1]:
            with replace_atomically(out / name) as tmp:
                np.lib.format.open_memmap(tmp, "w+", dtype, shape)
        with replace_atomically(out / METADATA) as tmp:  # written last: its presence means the arrays exist
            tmp.write_text(json.dumps(meta, indent=1))
    except OSError as e:
        for name in NAMES:  # what was created is removed: a full disk is left as it was
            (out / name).unlink(missing_ok=True)
        if e.errno != errno.ENOSPC:
            raise
        raise UserError(e.strerror) from None


def write_rows(array, start, rows):
    """array[start:start + len(rows)] = rows for a .npy memory map, written to its file and synced. Not through the
    map: on a full disk, a store into an unallocated page of a sparse map kills the process (SIGBUS)."""
    try:
        with open(array.filename, "r+b") as f:
            f.seek(array.offset + start * array[0].nbytes)
            f.write(np.ascontiguousarray(rows, dtype=array.dtype).tobytes())
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise UserError(f"no space left while writing {array.filename}; the batches written so far are kept: "
                        f"free some space and run the same command again to continue") from None


def main(args):
    """Prepare --data-path into --out. No horizontal flips, as REPA (SiT and DiT flip online): a flipped copy would
    have to be encoded separately, doubling the moments."""
    if args.image_size % DOWNSAMPLING:
        raise UserError(f"--image-size must be a multiple of {DOWNSAMPLING} (the VAE's downsampling)")
    # Rank 0 lists and hashes before the first barrier: on a slow file system, longer than the default 10 minutes.
    rank, world_size, device = init_distributed(timeout=timedelta(hours=2))
    out = Path(args.out)
    if rank == 0:  # the others wait
        files, labels, classes = list_image_folder(args.data_path)
        vae = load_vae(args.vae, device)  # before the folder exists: weights that do not load leave nothing behind
        meta = {"format": FORMAT_VERSION, "image_size": args.image_size, "images": args.images,
                "batch_size": args.batch_size, "bf16": args.bf16, "num_images": len(files),
                "files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
                "vae_sha256": file_sha256(vae_weights_path(args.vae)), "vae": args.vae, "classes": classes,
                "source": str(Path(args.data_path).resolve()), "horizontal_flip": False,
                "moments": f"VAE posterior mean and std, unscaled: latents = (mean + std·ε)·{LATENT_SCALE}",
                "torch": torch.__version__, "code": git_commit()}
        start_or_continue(out, meta, files, labels)
        print(f"{len(files):,} images in {len(classes):,} classes → {out}")
    barrier()
    if rank != 0:
        vae = load_vae(args.vae, device)  # the files rank 0 fetched
    meta = read_metadata(out)
    files = (out / FILES).read_text().splitlines()
    status, moments = np.load(out / STATUS, mmap_mode="r"), np.load(out / MOMENTS, mmap_mode="r")  # see write_rows
    images = np.load(out / IMAGES, mmap_mode="r") if meta["images"] else None

    # Fixed chunks of batch_size images: the same chunk is the same batch however often the run is interrupted
    # and however many ranks share the work, so the result equals that of one uninterrupted run.
    B, N = meta["batch_size"], len(files)
    pending = [range(lo, min(N, lo + B)) for lo in range(0, N, B) if (status[lo:lo + B] == PENDING).any()]
    barrier()  # every rank has read the same status before anyone writes to it
    if world_size > 1:
        print(f"rank {rank}: {len(pending[rank::world_size])} of {len(pending)} pending batches")
    loader = DataLoader(ImageFiles(args.data_path, files, meta["image_size"]), batch_sampler=pending[rank::world_size],
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    for index, batch, errors in tqdm(loader, desc="encoding", unit="batch", disable=rank != 0):
        ok = torch.tensor([not error for error in errors])
        chunk_moments = torch.zeros(len(index), *moments.shape[1:])
        if ok.any():
            chunk_moments[ok] = encode_images(vae, batch[ok], chunk_size=B, bf16=meta["bf16"]).cpu()
        lo = int(index[0])
        write_rows(moments, lo, chunk_moments.numpy())
        if images is not None:
            write_rows(images, lo, batch.numpy())
        for i, error in zip(index.tolist(), errors):
            if error:
                tqdm.write(f"warning: skipped unreadable image {files[i]} ({error})")
        write_rows(status, lo, np.where(ok.numpy(), DONE, SKIPPED))  # after the data it vouches for, which is on disk
    barrier()
    if rank == 0:
        final = np.load(out / STATUS)
        print(f"done: {(final == DONE).sum():,} images encoded, {(final == SKIPPED).sum():,} skipped as unreadable")
    close_distributed()


if __name__ == "__main__":
    run(main, build_parser().parse_args())
