"""Convergence of runs: each checkpoint's samples scored, one line per checkpoint in the run's eval.jsonl, and the
curves and milestone samples drawn (the paper's Table 1 at 400K, its samples at increasing iterations, Table A2).

    torchrun --nproc_per_node=8 evaluate.py results/000-SiT-B-2-sit results/001-SiT-B-2-diverse \\
        --ref data/VIRTUAL_imagenet256_labeled.npz --out sit-vs-diverse.png        # FID-10K at every checkpoint
    python evaluate.py results-ab/* --ref builtin:shapes --sampler euler --num-samples 2000  # the built-in data

For each checkpoint not yet scored with these settings: --num-samples images as sample.py's FID batch (resumable),
then fid.py's metrics against --ref, in this process (IS, FID, sFID, precision, recall); on the built-in data, whose
16-px shapes Inception cannot judge, `builtin_metrics`. Then RUN/curves.png (training terms and scores against steps),
RUN/milestones.png (EMA samples of every checkpoint from the same noise) and, for several runs, --out side by side.
An interrupted call, repeated, continues; scored checkpoints are skipped.
"""
import argparse
import json
from pathlib import Path

BUILTIN_REFERENCE = "builtin:shapes"  # --ref for runs on the built-in data (data.BUILTIN_DATA)
HELD_OUT_SEED = 1234  # the built-in reference shapes: a seed no run of the README trains on


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders written by train.py")
    p.add_argument("--ref", required=True, help=f"fid.py's reference (an ADM .npz or a folder of images), or "
                                                f"{BUILTIN_REFERENCE} for runs on the built-in data")
    p.add_argument("--num-samples", type=int, default=10_000, help="per checkpoint: 10K for curves, 50K for tables")
    p.add_argument("--sampler", default="sde", help="as sample.py (the papers' FIDs: sde, 250 steps)")
    p.add_argument("--num-steps", type=int, default=None, help="default: sample.py's for the sampler")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-proc-batch-size", type=int, default=32)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--vae", default="ema")
    p.add_argument("--sample-dir", default="samples")
    p.add_argument("--inception", default=None, help="as fid.py's --inception")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception forward (ADM: 64)")
    p.add_argument("--milestone-samples", type=int, default=8, help="images per checkpoint in milestones.png")
    p.add_argument("--out", default=None, help="several runs: their curves side by side in this PNG")
    return p


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad flags answer here, before the heavy imports below

import numpy as np
import torch

import fid
import sample
from curves import draw_curves, draw_milestones, read_run
from data import ShapesDataset, shapes_classifier
from runtime import UserError, checkpoint_steps, close_distributed, init_distributed, replace_atomically, run
from vae import LATENT_CHANNELS, file_sha256, load_vae

SETTINGS = ("num_samples", "sampler", "num_steps", "cfg_scale", "guidance_interval", "weights", "seed",
            "sampling_precision", "reference_sha256")  # a checkpoint scored with all of these equal is not scored again


def sample_args(args, ckpt):
    """sample.py's arguments for this checkpoint's FID batch: its defaults and the flags both share, checked by it."""
    defaults = vars(sample.build_parser().parse_args(["--ckpt", str(ckpt)]))
    shared = {key: value for key, value in vars(args).items() if key in defaults}
    sargs = argparse.Namespace(**{**defaults, **shared, "ckpt": str(ckpt), "num_fid_samples": args.num_samples})
    sample.check_args(sargs)
    return sargs


def builtin_metrics(npz, seed):
    """The built-in data's scores of a sample batch: the Fréchet distance between its images and as many held-out
    shapes in the features of data.shapes_classifier (its last hidden layer, flattened), that classifier's accuracy
    on the labels the samples were drawn for (sample.SampleRandomness), and its accuracy on the held-out shapes."""
    images = torch.from_numpy(np.load(npz)["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, S, S), [-1, 1]
    N, S = len(images), images.shape[-1]
    shapes = ShapesDataset(N, S, seed=HELD_OUT_SEED)
    held_out = torch.stack([shapes[i][0] for i in range(N)])                                 # (N, 3, S, S)
    classifier = shapes_classifier(S)
    labels = sample.SampleRandomness(seed, range(N)).labels(shapes.num_classes)  # the FID batch's labels
    with torch.no_grad():
        f_s, f_r = (classifier[:-1](x).double().numpy() for x in (images, held_out))       # (N, F) each
        accuracy = (classifier(images).argmax(dim=1) == labels).double().mean().item()
        held_out_accuracy = (classifier(held_out).argmax(dim=1) == torch.arange(N) % 10).double().mean().item()
    return {"frechet_distance": fid.frechet_distance(f_s.mean(0), np.cov(f_s, rowvar=False), f_r.mean(0),
                                                     np.cov(f_r, rowvar=False)),
            "accuracy": accuracy, "classifier_held_out_accuracy": held_out_accuracy}


def score(run_dir, args, reference, inception, rank, world_size, device):
    """Append a line to run_dir/eval.jsonl for each checkpoint not yet scored with these settings."""
    lines = read_run(run_dir)["eval"]
    for step in checkpoint_steps(run_dir / "checkpoints"):
        ckpt = run_dir / "checkpoints" / f"{step:07d}.pt"
        sargs = sample_args(args, ckpt)
        record = {"step": step, "checkpoint": str(ckpt), "num_samples": args.num_samples, "sampler": sargs.sampler,
                  "num_steps": sargs.num_steps, "cfg_scale": args.cfg_scale,
                  "guidance_interval": [args.guidance_low, args.guidance_high], "weights": args.weights,
                  "seed": args.seed, "sampling_precision": args.precision, "reference": args.ref,
                  "reference_sha256": reference["sha256"]}
        if any(line["step"] == step and all(line.get(k) == record[k] for k in SETTINGS) for line in lines):
            continue
        if rank == 0:
            print(f"{run_dir.name}: scoring step {step} on {args.num_samples} samples", flush=True)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = sargs.tf32  # as sample.py
        stem, _ = sample.sample_outputs(sargs, rank, world_size, device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as fid.py
        npz = sample.beside(stem, ".npz")
        if reference["source"] is not None:  # every rank extracts the features of its share of the samples
            source = fid.open_source(npz)
            features = fid.extract_features(inception, source, args.batch_size, rank, world_size, "samples")
        if rank == 0:  # the file rewritten whole: a line cut short by an interruption is never appended to
            scores = (builtin_metrics(npz, args.seed) if reference["source"] is None  # the built-in data: small
                      else fid.adm_metrics(reference["source"], reference["features"], source, features))
            lines.append({**record, **scores})
            with replace_atomically(run_dir / "eval.jsonl") as tmp:
                tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
            print("  " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))


def draw_milestones_of(run_dir, args, device):
    """run_dir/milestones.png: --milestone-samples EMA images of every checkpoint, the same noise and labels in every
    row (sample indices 0…n−1 of --seed; grid classes as sample.py's); `main` has filled in --num-steps."""
    rows, vae, n = [], None, args.milestone_samples
    for step in checkpoint_steps(run_dir / "checkpoints"):
        model, description = sample.load_sampling_model(run_dir / "checkpoints" / f"{step:07d}.pt", args.weights)
        if vae is None and description["in_channels"] == LATENT_CHANNELS:
            vae = load_vae(args.vae, device)
        images = sample.generate(model.to(device), vae, list(range(n)), seed=args.seed, sampler=args.sampler,
                                 num_steps=args.num_steps, cfg_scale=args.cfg_scale, bf16=args.precision == "bf16",
                                 interval=(args.guidance_low, args.guidance_high),
                                 labels=sample.grid_labels(model.num_classes, per_class=1).repeat(n)[:n])
        rows.append((step, images.numpy()))
    draw_milestones(rows, run_dir / "milestones.png")


def main(args):
    runs = [Path(r) for r in args.runs]
    if args.num_samples < fid.PR_NEIGHBOURS + 1:
        raise UserError(f"--num-samples must be at least {fid.PR_NEIGHBOURS + 1} (precision and recall's k + 1)")
    args.num_steps = sample_args(args, "CKPT").num_steps  # the shared flags checked by sample.py (reads no file)
    for run_dir in runs:  # every run checked before any work
        if not checkpoint_steps(run_dir / "checkpoints"):
            raise UserError(f"{run_dir} has no checkpoints (expected {run_dir / 'checkpoints'}/NNNNNNN.pt)")
    rank, world_size, device = init_distributed()
    reference, inception = {"source": None, "sha256": BUILTIN_REFERENCE}, None
    if args.ref != BUILTIN_REFERENCE:  # the reference's features once, for every checkpoint of every run
        source = fid.open_source(args.ref)
        inception = fid.load_inception(args.inception, device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as fid.py
        features = fid.extract_features(inception, source, args.batch_size, rank, world_size, "reference")
        reference = {"source": source, "features": features,
                     "sha256": file_sha256(args.ref) if Path(args.ref).is_file() else str(Path(args.ref).resolve())}
    for run_dir in runs:
        score(run_dir, args, reference, inception, rank, world_size, device)
        if rank == 0:
            draw_curves({run_dir.name: read_run(run_dir)}, run_dir / "curves.png")
            draw_milestones_of(run_dir, args, device)
            print(f"saved {run_dir / 'eval.jsonl'}, {run_dir / 'curves.png'} and {run_dir / 'milestones.png'}")
    if rank == 0 and args.out:
        draw_curves({run_dir.name: read_run(run_dir) for run_dir in runs}, Path(args.out))
        print(f"saved {args.out}")
    close_distributed()


if __name__ == "__main__":
    run(main, build_parser().parse_args())
