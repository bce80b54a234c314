"""Training SiT with DiverseDiT's additions, and REPA, DispLoss and SRA, on one device or many (torchrun).

    torchrun --nnodes=1 --nproc_per_node=8 train.py --model SiT-B/2 --data-path data/in256 --repa --diverse
    python train.py --model SiT-Tiny/4 --data-path builtin:shapes --diverse ...     # README's CPU quick start

The objective (one line in `total_loss`), each term from losses.py and switched on by its flag:

    L = L_fm + 0.5·L_REPA + w(L_div)·L_div + 0.25·L_DispLoss + 0.2·L_SRA
        (flow matching, --repa, --diverse / --diversity-loss, --disploss, --sra; the coefficients are flags)

Results go to results/NNN-<model>-<switches>/: log.txt, args.json, metrics.jsonl, checkpoints/NNNNNNN.pt and,
every --sample-every steps, samples/NNNNNNN.png (an EMA grid). `--resume RUN_DIR_OR_CKPT` continues a run exactly.
"""
import argparse
import copy
import math
import sys
import time
from pathlib import Path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with every default (None: decided at run time, as the flag's help says) and the description as written."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def comma_list(kind):
    return lambda text: [kind(item) for item in text.split(",")]


def layer_count(text):
    return None if text == "all" else int(text)


def build_parser():
    """The flags, from the standard library only: --help answers before torch is imported."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # What to train on and where to write
    p.add_argument("--model", default="SiT-B/2", help="SiT-{S,B,L,XL,Tiny}/{2,4,8} (models.SiT_models)")
    p.add_argument("--data-path", default=None, help="a folder prepared by data.py, or builtin:shapes")
    p.add_argument("--builtin-image-size", type=int, default=32, help="image size of builtin:shapes")
    p.add_argument("--builtin-num-images", type=int, default=10_000, help="number of images of builtin:shapes")
    p.add_argument("--results-dir", default="results", help="where the numbered run folders go")
    p.add_argument("--resume", default=None, help="a run folder (its newest checkpoint that loads) or one of its "
                                                  "checkpoints")
    # Method switches (L_div's defaults copy losses.py's DIVERSITY_TERMS, DIVERSITY_LAYERS, ADAPTIVE_WEIGHT_RANGE:
    # --help needs no torch)
    p.add_argument("--diverse", action="store_true", help="DiverseDiT: --long-residual and --diversity-loss")
    p.add_argument("--long-residual", action="store_true", help="long residual connections (paper Sec. 3.1)")
    p.add_argument("--diversity-loss", action="store_true", help="L_div with its adaptive weight (paper Sec. 3.2)")
    p.add_argument("--diversity-terms", type=comma_list(str), default=["orth", "mi", "disp"],
                   help="L_div's terms, comma-separated (Tables 7, A8, A9 keep one)")
    p.add_argument("--diversity-layers", type=layer_count, default=10,
                   help="K of L_div's block-pair rule, or 'all' (Table A7)")
    p.add_argument("--adaptive-range", type=float, nargs=2, default=[0.1, 0.5], metavar=("LO", "HI"),
                   help="where w ramps from 0 to 1 (Table 8)")
    p.add_argument("--constant-weight", action="store_true", help="w = 1 (Table 8, where it diverges)")
    p.add_argument("--repa", action="store_true", help="REPA: align blocks to a frozen encoder's patch tokens")
    p.add_argument("--enc-type", type=comma_list(str), default=["dinov2-vit-b"],
                   help="REPA's encoders, comma-separated (encoders.ENCODERS; REPA, the paper: DINOv2-B)")
    p.add_argument("--encoder-depth", type=comma_list(int), default=None,
                   help="REPA's aligned blocks, comma-separated: one per encoder, one for all, or one encoder at each "
                        "(default: the paper's Table A1, 5 for B, 8 for L and XL)")
    p.add_argument("--encoder-dir", default="ckpts", help="the folder of MAE's and MoCo v3's published weight files")
    p.add_argument("--proj-coeff", type=float, default=0.5, help="REPA's λ (REPA, the paper)")
    p.add_argument("--projector-dim", type=int, default=2048, help="REPA projector's hidden width (REPA)")
    p.add_argument("--disploss", action="store_true", help="DispLoss (Wang & He), PyTorch release settings")
    p.add_argument("--disploss-coeff", type=float, default=0.25, help="DispLoss λ (its PyTorch release)")
    p.add_argument("--disploss-tau", type=float, default=1.0, help="DispLoss τ (its PyTorch release)")
    p.add_argument("--disploss-block", type=int, default=None, help="DispLoss block, 1-indexed (default: the last)")
    p.add_argument("--sra", action="store_true", help="SRA: align a block to the EMA teacher's deeper block")
    p.add_argument("--sra-coeff", type=float, default=0.2, help="SRA's weight (its paper, 256 px)")
    p.add_argument("--sra-beta", type=float, default=0.05, help="SRA's smooth-L1 β (its paper)")
    p.add_argument("--sra-t-max", type=float, default=0.2, help="SRA teacher time offset: t − t_max·U(0, 1) (SRA)")
    p.add_argument("--sra-student-block", type=int, default=None, help="default: 4 for B, 8 for XL (SRA)")
    p.add_argument("--sra-teacher-block", type=int, default=None, help="default: 8 for B, 20 for XL (SRA)")
    p.add_argument("--class-dropout-prob", type=float, default=0.1, help="label dropout for CFG (DiT, SiT, REPA)")
    p.add_argument("--meanflow", action="store_true", help="MeanFlow's objective (one-step generation)")
    p.add_argument("--mf-omega", type=float, default=1.0, help="MeanFlow guidance ω in training (official B/2: 1)")
    p.add_argument("--mf-kappa", type=float, default=0.5, help="MeanFlow guidance κ in training (official B/2: 0.5)")
    p.add_argument("--mf-t-start", type=float, default=0.0, help="MeanFlow: guide the target where t ≥ this")
    p.add_argument("--mf-t-end", type=float, default=1.0, help="MeanFlow: and t ≤ this (official B/2: [0, 1])")
    p.add_argument("--learn-sigma", action="store_true", help="SiT's 2·C outputs (only for SiT-compatible weights)")
    # Optimisation: REPA's and the authors' release's defaults (the paper: AdamW, lr 1e-4, batch 256, 400K steps)
    p.add_argument("--max-steps", type=int, default=400_000, help="(the paper's Tables 1, 4, 6–9)")
    p.add_argument("--global-batch-size", type=int, default=256, help="split over the processes (the paper)")
    p.add_argument("--lr", type=float, default=1e-4, help="constant (the paper, REPA)")
    p.add_argument("--beta1", type=float, default=0.9, help="(the paper)")
    p.add_argument("--beta2", type=float, default=None, help="default 0.999 (the paper), 0.95 with --meanflow "
                                                               "(MeanFlow's official code)")
    p.add_argument("--adam-eps", type=float, default=1e-8, help="(REPA)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="(the paper: without decay)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (REPA)")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="(DiT, SiT, REPA)")
    p.add_argument("--global-seed", type=int, default=0, help="(REPA's README command: 0)")
    # Speed
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on CUDA")
    p.add_argument("--num-workers", type=int, default=4, help="data loading processes per rank")
    # Logging, checkpoints, previews
    p.add_argument("--log-every", type=int, default=100, help="(REPA)")
    p.add_argument("--ckpt-every", type=int, default=50_000, help="milestone checkpoints, all kept (REPA)")
    p.add_argument("--save-every", type=int, default=5_000, help="checkpoints for resuming, the last --keep-last kept")
    p.add_argument("--keep-last", type=int, default=2, help="resume checkpoints kept")
    p.add_argument("--sample-every", type=int, default=10_000, help="EMA preview grid every N steps, 0: never (REPA)")
    p.add_argument("--sample-cfg-scale", type=float, default=4.0, help="preview guidance (SiT / REPA previews: 4)")
    p.add_argument("--vae", default="ema", help="decoder for latent previews: 'ema', 'mse' or a path")
    return p


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad flags answer here, before the heavy imports below

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import BUILTIN_DATA, InfiniteSampler, open_dataset
from encoders import check_encoder, load_encoders
from losses import (DIVERSITY_TERMS, adaptive_weight, disploss, diversity_loss, diversity_pairs,
                    flow_matching_loss, interpolate, meanflow_guided_velocity, meanflow_loss, meanflow_target,
                    repa_loss, sample_meanflow_times, sra_loss, sra_teacher_time)
from models import SIT_SIZES, SiT_models, build_model
from runtime import (UserError, all_gather, check_finite, check_resumable, close_distributed, create_logger,
                     git_commit, init_distributed, load_checkpoint, local_batch_size, log_metrics, new_run_dir, run,
                     save_checkpoint, truncate_metrics)
from sample import generate, grid_labels, save_grid
from vae import load_vae, sample_latents

# REPA alignment depth: the paper's Table A1 (5 for B, 8 for L and XL). Other sizes need --encoder-depth.
ENCODER_DEPTH = {"B": 5, "L": 8, "XL": 8}
# SRA (student block, teacher block), 1-indexed: SRA's code defaults (depth 12, the B model of the paper's
# Table 9) and its README's SiT-XL/2 setting. Other sizes need --sra-student-block and --sra-teacher-block.
SRA_BLOCKS = {"B": (4, 8), "XL": (8, 20)}
TERMS = ("fm", "mf_mse", "repa", "div", "div_orth", "div_mi", "div_disp", "w", "disploss", "sra")  # training_losses
LOGGED = ("loss", *TERMS, "grad_norm")  # every --log-every steps, averaged over steps and processes


# ---------------------------------------------------------------- the loss terms

def training_losses(model, x, y, images=None, *, block_losses=None, encoders=(), teacher=None, sra_block=None,
                    sra_t_max=0.2, sra_beta=0.05, meanflow=None, bf16=False):
    """Every loss term of one step (TERMS) as a float32 scalar, absent terms 0: one forward of `model` (maybe
    DDP-wrapped or compiled) with gradients, plus, without them, REPA's encoder, SRA's teacher, MeanFlow's JVP.
    x: (N, C, H, W) clean latents or pixels; y: (N,) labels; images: (N, 3, S, S) uint8, REPA's encoder input;
    block_losses: the blocks' outputs → DiverseDiT's and DispLoss's terms (`block_losses_for`);
    encoders: REPA's target encoder of each projector (an encoder may serve several blocks);
    teacher: SRA's EMA teacher, aligned at its `sra_block` (1-indexed);
    meanflow: (the bare network, its guidance settings) for MeanFlow's objective instead of flow matching."""
    terms = dict.fromkeys(TERMS, x.new_zeros(()))
    features = block_losses is not None or bool(encoders) or teacher is not None
    eps = torch.randn_like(x)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        if meanflow is None:  # flow matching (SiT, REPA): x_t = (1 − t)·x + t·ε, target v = ε − x
            t = torch.rand(len(x), device=x.device)  # (N,), t ~ U(0, 1)
            x_t, v = interpolate(x, eps, t)
            out = model(x_t, t, y, return_features=features)
            v_pred, feats = out if features else (out, None)
            terms["fm"] = flow_matching_loss(v_pred, v).mean()
            if encoders:
                with torch.no_grad():  # each encoder once, however many blocks it is aligned with
                    tokens = {encoder: encoder(images) for encoder in dict.fromkeys(encoders)}  # (N, T, Z) each
                terms["repa"] = repa_loss(feats.repa, [tokens[encoder] for encoder in encoders]).mean()
            if teacher is not None:
                t_teacher = sra_teacher_time(t, sra_t_max)
                with torch.no_grad():  # the EMA teacher, same data, noise and (dropped) labels, less noisy
                    x_teacher = interpolate(x, eps, t_teacher)[0]
                    teacher_blocks = teacher(x_teacher, t_teacher, feats.labels, return_features=True)[1].blocks
                terms["sra"] = sra_loss(feats.sra, teacher_blocks[sra_block - 1], sra_beta).mean()
        else:  # MeanFlow's objective (below); of the other terms, only DiverseDiT's combine with it
            u_pred, u_target, feats = meanflow_prediction(model, *meanflow, x, eps, y, features)
            terms["fm"] = meanflow_loss(u_pred, u_target).mean()  # ≈ 1 by its adaptive weight: it does not fall
            terms["mf_mse"] = (u_pred.float() - u_target.float()).pow(2).mean()  # unweighted: the error that falls
    if block_losses is not None:
        terms.update(block_losses(feats.blocks))
    return terms


def block_losses_for(args, depth):
    """The terms computed on the blocks' outputs, bound to the run's settings: L_div over the pairs P (with its parts
    and its weight w) and DispLoss on one block; None when no term needs them."""
    pairs = run_pairs(args, depth)
    weight_range = None if args.constant_weight else args.adaptive_range

    def block_losses(blocks):  # L × (N, T, D) → {term: scalar}
        terms = {}
        if pairs:
            div = diversity_loss(blocks, pairs, args.diversity_terms)
            terms.update(div=div.total, div_orth=div.orthogonality, div_mi=div.mutual_information,
                         div_disp=div.dispersion, w=adaptive_weight(div.total, weight_range))
        if args.disploss:
            terms["disploss"] = disploss(blocks[args.disploss_block - 1], args.disploss_tau)
        return terms
    return block_losses if pairs or args.disploss else None


def run_pairs(args, depth):
    """The run's block pairs P (none without L_div); with several aligned blocks, the release's rule takes the first."""
    if not args.diversity_loss:
        return ()
    try:
        return diversity_pairs(depth, args.encoder_depth and args.encoder_depth[0], args.diversity_layers)
    except ValueError as e:  # the release's rule finds no pairs for these settings
        raise UserError(f"{e}: choose another --encoder-depth or --diversity-layers") from None


def total_loss(terms, args):
    """L = L_fm + λ_REPA·L_REPA + w(L_div)·L_div + λ_DispLoss·L_DispLoss + λ_SRA·L_SRA (absent terms are 0).
    λ_SRA is constant: SRA decays it only after epoch 149, past the papers' 80 epochs (400K steps at batch 256)."""
    return (terms["fm"] + args.proj_coeff * terms["repa"] + terms["w"] * terms["div"]
            + args.disploss_coeff * terms["disploss"] + args.sra_coeff * terms["sra"])


# ---------------------------------------------------------------- MeanFlow (Geng et al. 2025)

def meanflow_prediction(model, raw_model, guidance, x, eps, y, features):
    """(u_θ(z_t, r, t), u_tgt, features or None) for MeanFlow: the target from a JVP of the bare network without
    gradients (`losses.meanflow_target`), the prediction and the features from the one forward with gradients."""
    t, r = sample_meanflow_times(len(x), device=x.device)
    z_t, v = interpolate(x, eps, t)
    y = raw_model.y_embedder.drop(y)  # once, so that the JVP and the forward see the same labels
    v = meanflow_guided_velocity(lambda z, t, y: raw_model(z, t, y, r=t, drop_labels=False), z_t, t, y, v,
                                 raw_model.num_classes, guidance.mf_omega, guidance.mf_kappa,
                                 (guidance.mf_t_start, guidance.mf_t_end))
    with torch.autocast(x.device.type, enabled=False):  # the JVP in float32
        _, u_target = meanflow_target(lambda z, r, t: raw_model(z, t, y, r=r, drop_labels=False), z_t, r, t, v)
    out = model(z_t, t, y, r=r, drop_labels=False, return_features=features)
    u_pred, feats = out if features else (out, None)
    return u_pred, u_target, feats


# ---------------------------------------------------------------- EMA, resuming, run names, previews

@torch.no_grad()
def update_ema(ema, model, decay):
    """θ_EMA ← decay·θ_EMA + (1 − decay)·θ over all parameters, frozen ones included (as DiT / REPA)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)  # one fused pass


def save_preview(ema, vae, args, num_classes, path, logger):
    """An EMA grid, 4 images for each of up to 8 classes (`sample.grid_labels`)."""
    labels = grid_labels(num_classes)
    settings = (dict(sampler="meanflow", num_steps=1) if args.meanflow  # guidance is trained in
                else dict(num_steps=50, cfg_scale=args.sample_cfg_scale))
    logger.info(f"sampling the EMA preview grid ({len(labels)} images, {settings['num_steps']} steps)")
    images = generate(ema, vae, list(range(len(labels))), seed=args.global_seed, bf16=args.precision == "bf16",
                      labels=labels, **settings)
    path.parent.mkdir(exist_ok=True)
    save_grid(images, 4, path)
    logger.info(f"saved {path}")


# ---------------------------------------------------------------- main

def resolve_args(args):
    """Fill in the per-size defaults and refuse bad combinations, before any heavy work."""
    if args.model not in SiT_models:
        raise UserError(f"unknown model {args.model!r}; choose one of {', '.join(SiT_models)}")
    size = args.model.split("-")[1].split("/")[0]
    depth = SIT_SIZES[size][0]
    args.long_residual = args.long_residual or args.diverse
    args.diversity_loss = args.diversity_loss or args.diverse
    if args.repa:  # one alignment (encoder, block) per projector; a list of one repeats its entry
        if args.encoder_depth is None and size not in ENCODER_DEPTH:
            raise UserError(f"--repa on {args.model}: give --encoder-depth (the paper's Table A1 covers B, L, XL)")
        depths = args.encoder_depth or [ENCODER_DEPTH[size]]
        n = max(len(args.enc_type), len(depths))
        if {len(args.enc_type), len(depths)} - {1, n}:
            raise UserError(f"--enc-type names {len(args.enc_type)} encoders and --encoder-depth {len(depths)} blocks: "
                            f"give one of either, or as many of each")
        args.enc_type, args.encoder_depth = args.enc_type * (n // len(args.enc_type)), depths * (n // len(depths))
    else:
        args.enc_type = args.encoder_depth = None
    run_pairs(args, depth)  # refused here if the release's pair rule finds none for these settings
    if args.diversity_loss and (not args.diversity_terms or set(args.diversity_terms) - set(DIVERSITY_TERMS)):
        raise UserError(f"--diversity-terms {','.join(args.diversity_terms)}: choose one or more of "
                        f"{','.join(DIVERSITY_TERMS)}")
    student, teacher = SRA_BLOCKS.get(size, (None, None))
    args.sra_student_block = (args.sra_student_block or student) if args.sra else None
    args.sra_teacher_block = (args.sra_teacher_block or teacher) if args.sra else None
    if args.sra and None in (args.sra_student_block, args.sra_teacher_block):
        raise UserError(f"--sra on {args.model}: give --sra-student-block and --sra-teacher-block (defaults exist "
                        f"for {', '.join(SRA_BLOCKS)})")
    args.disploss_block = (args.disploss_block or depth) if args.disploss else None
    for flag, block in [("--disploss-block", args.disploss_block), ("--sra-student-block", args.sra_student_block),
                        ("--sra-teacher-block", args.sra_teacher_block),
                        *(("--encoder-depth", block) for block in args.encoder_depth or ())]:
        if block is not None and not 1 <= block <= depth:
            raise UserError(f"{flag} {block} is not a block of {args.model} (1..{depth})")
    if args.meanflow and (args.repa or args.disploss or args.sra or args.learn_sigma):
        raise UserError("--meanflow combines with --diverse (as in the paper), not with --repa, --disploss, --sra or "
                        "--learn-sigma")
    if args.meanflow and (args.mf_omega != 1.0 or args.mf_kappa != 0.0) and args.class_dropout_prob == 0:
        raise UserError("MeanFlow's guidance in training needs the null class: --class-dropout-prob > 0, or "
                        "--mf-omega 1 --mf-kappa 0")
    args.beta2 = args.beta2 if args.beta2 is not None else (0.95 if args.meanflow else 0.999)
    for flag in ("log_every", "save_every", "ckpt_every", "keep_last", "max_steps", "global_batch_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.data_path is None:
        raise UserError(f"--data-path is required (a folder prepared by data.py, or {BUILTIN_DATA})")
    args.precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    args.compile = torch.cuda.is_available() if args.compile is None else args.compile
    return args


def main(args):
    args = resolve_args(args)
    rank, world_size, device = init_distributed()
    local_batch = local_batch_size(args.global_batch_size, world_size)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    dataset = open_dataset(args.data_path, images=args.repa, builtin_num_images=args.builtin_num_images,
                           builtin_image_size=args.builtin_image_size, seed=args.global_seed)
    args.data_kind = "latent" if dataset.latent else "pixel"
    args.image_size, args.num_classes, args.num_samples = dataset.image_size, dataset.num_classes, len(dataset)
    if len(dataset) < args.global_batch_size:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch "
                        f"({args.global_batch_size})")
    ckpt, notes = None, []
    if args.resume:  # found first, so that a mismatch is refused before anything heavy is built
        ckpt, ckpt_path, run_dir, notes = load_checkpoint(args.resume, repair=rank == 0)
        check_resumable(ckpt["args"], args)
    # Rank 0's own work (the VAE for previews) comes before the first collective, so that its errors end the run
    # instead of leaving the other ranks waiting.
    C, H, _ = dataset.input_shape
    num_tokens = (H // int(args.model.rsplit("/")[1])) ** 2
    for name in args.enc_type or ():
        check_encoder(name, args.image_size, num_tokens, args.encoder_dir)
    vae = load_vae(args.vae, device) if rank == 0 and args.sample_every and dataset.latent else None
    encoders = [e.to(device) for e in load_encoders(args.enc_type or [], args.image_size, num_tokens, args.encoder_dir)]
    if not args.resume:  # only now, after every check: a refused run leaves no folder behind
        run_dir = new_run_dir(args, world_size, device) if rank == 0 else None
        run_dir = Path(all_gather(str(run_dir), world_size)[0])
    logger = create_logger(run_dir, rank)
    logger.info(f"code {git_commit()}, torch {torch.__version__}" + (f"; resuming {ckpt_path}" if ckpt else ""))
    for note in notes:
        logger.info(note)
    horizon = 1 / (1 - args.ema_decay) if args.ema_decay < 1 else math.inf
    if args.max_steps < horizon:
        logger.info(f"EMA decay {args.ema_decay} averages over about {horizon:,.0f} steps, more than this run's "
                    f"{args.max_steps:,}: the EMA weights will show mostly the initial network; try --ema-decay 0.99")

    torch.manual_seed(args.global_seed)  # the same initial weights on every rank
    model = build_model(args.model, input_size=H, in_channels=C, num_classes=dataset.num_classes,
                        class_dropout_prob=args.class_dropout_prob, learn_sigma=args.learn_sigma,
                        long_residual=args.long_residual, z_dims=[e.embed_dim for e in encoders],
                        encoder_depth=args.encoder_depth, projector_dim=args.projector_dim,
                        sra_depth=args.sra_student_block, meanflow=args.meanflow).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    hyper = dict(lr=args.lr, betas=(args.beta1, args.beta2), eps=args.adam_eps, weight_decay=args.weight_decay)
    optimizer = torch.optim.AdamW(model.parameters(), **hyper, fused=device.type == "cuda")
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["opt"])
        for group in optimizer.param_groups:  # the optimiser's settings are this run's flags, not the saved ones
            group.update(hyper)
        step = ckpt["steps"]
        logger.info(f"resumed from {ckpt_path} at step {step}")
        del ckpt
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else model
    compiled = torch.compile if args.compile else (lambda f: f)
    # The loss terms' settings. L_div stays eager: compiled whole, inductor's backward failed on an H200 with
    # torch 2.11 at SiT-B's width (each of its three terms compiled alone ran), although it would cost less.
    settings = dict(
        bf16=args.precision == "bf16", block_losses=block_losses_for(args, model.depth), encoders=encoders,
        teacher=compiled(ema) if args.sra else None, sra_block=args.sra_teacher_block, sra_t_max=args.sra_t_max,
        sra_beta=args.sra_beta, meanflow=(model, args) if args.meanflow else None)
    sampler = InfiniteSampler(len(dataset), local_batch, rank, world_size, args.global_seed, start=step)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True)

    if rank == 0 and args.resume and (run_dir / "metrics.jsonl").is_file():
        truncate_metrics(run_dir / "metrics.jsonl", step)
    logger.info(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters; "
                f"{len(dataset):,} training images; {world_size} process(es) × batch {local_batch}; "
                f"{args.precision}, compile {args.compile}; results in {run_dir}")

    model.train()
    train_model = compiled(ddp)
    progress = tqdm(total=args.max_steps, initial=step, disable=rank != 0, unit="step", dynamic_ncols=True)
    history = torch.zeros(args.log_every, len(LOGGED), device=device)  # LOGGED per step since the last log line
    logged_step, start_time = step, time.time()
    for batch in loader:
        # The step's randomness (t, ε, label dropout, the posterior sample) seeded from (seed, rank, step), as edm2
        # seeds: a resumed run draws exactly what an uninterrupted one would, with no random state to save.
        torch.manual_seed(hash((args.global_seed, rank, step)) % 2**63)
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        images = batch[2].to(device, non_blocking=True) if args.repa else None
        x = sample_latents(x) if dataset.latent else x  # a fresh posterior sample every step (REPA)
        terms = training_losses(train_model, x, y, images, **settings)
        loss = total_loss(terms, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        update_ema(ema, model, args.ema_decay)
        # Kept on the device: the host reads them only every --log-every steps (no per-step synchronisation).
        history[step - logged_step] = torch.stack([loss.detach(), *(terms[k].detach() for k in TERMS), grad_norm])
        step += 1
        progress.update(1)

        if step % args.log_every == 0 or step == args.max_steps:
            means = check_finite(history[:step - logged_step], LOGGED, logged_step, run_dir, world_size).tolist()
            speed = (step - logged_step) / max(time.time() - start_time, 1e-9)
            if rank == 0:
                log_metrics({"step": step, **dict(zip(LOGGED, means)), "steps_per_sec": speed,
                             "img_per_sec": speed * args.global_batch_size}, run_dir, logger, progress)
            logged_step, start_time = step, time.time()
        if step % args.save_every == 0 or step % args.ckpt_every == 0 or step == args.max_steps:
            check_finite(history[:step - logged_step], LOGGED, logged_step, run_dir, world_size)
            save_checkpoint(run_dir / "checkpoints" / f"{step:07d}.pt", model, ema, optimizer, args, step, rank,
                            world_size, logger)
        if rank == 0 and args.sample_every and (step % args.sample_every == 0 or step == args.max_steps):
            save_preview(ema, vae, args, dataset.num_classes, run_dir / "samples" / f"{step:07d}.png", logger)
        if step == args.max_steps:
            break
    progress.close()
    logger.info("done")
    close_distributed()


def parse_args(argv=None):
    """The flags; with --resume, the run's own are the defaults (--resume RUN_DIR suffices), flags given now win."""
    p = build_parser()
    known, _ = p.parse_known_args(argv)
    if known.resume:
        saved = load_checkpoint(known.resume)[0]["args"]  # main sets damaged ones aside
        p.set_defaults(**{k: v for k, v in saved.items() if k in vars(known) and k not in ("resume", "results_dir")})
    return p.parse_args(argv)


if __name__ == "__main__":
    run(lambda argv: main(parse_args(argv)), sys.argv[1:])  # parse_args reads --resume's checkpoint: inside run too
