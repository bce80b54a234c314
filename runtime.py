"""What the scripts share to run: the torchrun set-up, one-line errors for the user's mistakes, atomic file
replacement, the code version a run records; and train.py's run folders and checkpoints (DiT's layout:
results/NNN-<name>/ with log.txt and checkpoints/NNNNNNN.pt)."""
import contextlib
import errno
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy
import torch
import torch.distributed as dist
import torchvision


def init_distributed(timeout=None):
    """(rank, world_size, device); `timeout` bounds each collective (torch's default if None). Under torchrun: NCCL on
    GPUs, gloo on CPUs, the GPU from LOCAL_RANK (the global rank would index past a node's GPUs on the second node:
    DiT #79, SiT #8). Without torchrun: rank 0 of 1, on CUDA if present. Workers outlive a torchrun agent killed
    with SIGKILL (which it cannot forward; torchrun offers no hook): stop a run by killing the whole process group."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def close_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def git_commit():
    """The code's git commit (with "+changes" if the tree is dirty), or None outside a git checkout."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+changes" if dirty.strip() else "")


class UserError(ValueError):
    """A mistake in what the user gave (a flag, a file, a checkpoint): `run` prints it as one line, no traceback."""


def run(main, args):
    """main(args), with a UserError or a full disk printed as one `error: …` line (by rank 0 only) and exit status 2,
    as argparse does for bad flags. Anything else is a bug and keeps its traceback."""
    try:
        main(args)
    except Exception as e:
        if not (isinstance(e, UserError) or disk_full(e)):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e.strerror if isinstance(e, OSError) else e}", file=sys.stderr)
        sys.exit(2)


def temporary_path(path):  # where `replace_atomically` writes `path` before renaming it
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def replace_atomically(path):
    """Yield a temporary path beside `path`; if the block succeeds, rename it over `path` and sync the folder (the
    rename survives a power cut): a run killed at any moment leaves the old file or the new, never a truncated one.
    On an error the temporary is removed; a full disk is an OSError(ENOSPC) naming `path`."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if disk_full(e):
            raise OSError(errno.ENOSPC, f"no space left while writing {path}") from None
        raise
    with contextlib.suppress(OSError):  # fsync the folder where the OS allows it (some cannot open or sync one)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def disk_full(error):
    """Whether `error` or an error it hides is ENOSPC: torch.save and PIL wrap the file's own OSError in theirs."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


# ---------------------------------------------------------------- run folders and checkpoints (train.py)

# train.py's settings that a resumed run must share with its checkpoint (others, e.g. --max-steps, may change).
RESUME_MUST_MATCH = ("model", "data_kind", "image_size", "num_classes", "num_samples", "global_batch_size",
                     "global_seed", "long_residual", "diversity_loss", "diversity_terms", "diversity_layers",
                     "adaptive_range", "constant_weight", "repa", "enc_type", "encoder_depth", "projector_dim",
                     "disploss", "disploss_block", "sra", "sra_student_block", "sra_teacher_block", "learn_sigma",
                     "class_dropout_prob", "ckpt_every", "meanflow", "mf_omega", "mf_kappa", "mf_t_start", "mf_t_end")


def run_folder_name(args):
    """<model>-<switches> of the run folder results/NNN-<model>-<switches> (DiT / SiT layout)."""
    switches = [name for name, on in [("meanflow", args.meanflow), ("repa", args.repa), ("longres", args.long_residual),
                                      ("div", args.diversity_loss), ("disploss", args.disploss), ("sra", args.sra)]
                if on]
    if args.long_residual and args.diversity_loss:
        switches = ["diverse" if s == "longres" else s for s in switches if s != "div"]
    return f"{args.model.replace('/', '-')}-{'-'.join(switches) or 'sit'}"


def local_batch_size(global_batch_size, world_size):
    if global_batch_size % world_size:
        raise UserError(f"--global-batch-size {global_batch_size} is not divisible by {world_size} processes")
    return global_batch_size // world_size


def new_run_dir(args, world_size, device):
    """results/NNN-<model>-<switches>, NNN one more than the runs already there (DiT / SiT), with args.json: train.py's
    resolved flags, the code's commit and the library versions."""
    record = {**vars(args), "world_size": world_size, "device": str(device), "code": git_commit(),
              "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                           "torchvision": torchvision.__version__, "numpy": numpy.__version__}}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in results_dir.iterdir() if (m := re.match(r"(\d+)-", p.name))]
    run_dir = results_dir / f"{max(numbers, default=-1) + 1:03d}-{run_folder_name(args)}"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "args.json").write_text(json.dumps(record, indent=1) + "\n")
    return run_dir


def create_logger(run_dir, rank):
    """Rank 0 logs to stdout and run_dir/log.txt; the other ranks stay silent (DiT)."""
    logger = logging.getLogger("train")
    for handler in logger.handlers[:]:  # a previous run in this process (the tests)
        handler.close()
        logger.removeHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "log.txt")) if rank == 0 else ():
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    return logger


def log_metrics(record, run_dir, logger, progress):
    """One line of metrics.jsonl, of log.txt and of the progress bar."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_sec']:.1f}")
    logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def all_gather(obj, world_size):
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def truncate_metrics(path, step):
    """Drop the lines of metrics.jsonl that an interrupted run logged after its last checkpoint (the resumed run
    logs those steps again), and a last line cut short by the interruption."""
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            if json.loads(line)["step"] <= step:
                kept.append(line)
    with replace_atomically(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in kept))


def save_checkpoint_file(obj, path):
    """torch.save through `replace_atomically`, fsynced; a full disk is one line naming the checkpoint still intact."""
    try:
        with replace_atomically(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise UserError(f"{e.strerror}; the last checkpoint ({last_checkpoint(path.parent)}) is intact") from None


def check_finite(history, names, first_step, run_dir, world_size):
    """The means of `history` (steps since `first_step` × `names`) over steps and processes; an error naming the
    first step at which any process saw a non-finite value, and those values, before anything is saved."""
    if len(history) == 0:  # checked already (a checkpoint right after a log line)
        return None
    bad = (~torch.isfinite(history)).to(torch.uint8)  # uint8: all-reducible
    sums = history.sum(dim=0)
    if world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        dist.all_reduce(sums)
    if bad.any():
        i = bad.any(dim=1).nonzero()[0].item()
        names = [name for name, b in zip(names, bad[i].tolist()) if b]
        raise FloatingPointError(f"non-finite {', '.join(names)} at step {first_step + i + 1}; stopped before saving, "
                                 f"the last checkpoint ({last_checkpoint(run_dir / 'checkpoints')}) is intact")
    return sums / (len(history) * world_size)


def save_checkpoint(path, model, ema, optimizer, args, step, rank, world_size, logger):
    """Rank 0 saves (once the ranks' weights agree) and prunes; the others wait."""
    weight_sums = all_gather(float(sum(p.detach().double().sum() for p in model.parameters())), world_size)
    if len(set(weight_sums)) > 1:
        raise RuntimeError(f"the ranks' weights differ at step {step} (sums {weight_sums})")
    if rank == 0:
        save_checkpoint_file({"model": model.state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict(),
                              "args": vars(args), "steps": step}, path)
        prune_checkpoints(path.parent, args.keep_last, args.ckpt_every)
        logger.info(f"saved {path} (weights identical across {world_size} rank(s))")
    barrier()


def check_resumable(saved, args):
    changed = [f"{key}: {saved.get(key)!r} in the checkpoint, {getattr(args, key)!r} now" for key in RESUME_MUST_MATCH
               if saved.get(key) != getattr(args, key)]
    if changed:
        raise UserError("cannot resume a run with other settings: " + "; ".join(changed))


def checkpoint_steps(folder):
    return sorted(int(p.stem) for p in Path(folder).glob("*.pt") if p.stem.isdigit())


def last_checkpoint(folder):
    steps = checkpoint_steps(folder)
    return folder / f"{steps[-1]:07d}.pt" if steps else "none"


def prune_checkpoints(folder, keep_last, milestone_every):
    """Keep the newest `keep_last` checkpoints and every milestone (a multiple of `milestone_every`)."""
    for step in checkpoint_steps(folder)[:-keep_last]:
        if step % milestone_every:
            (folder / f"{step:07d}.pt").unlink()


def checkpoints_to_try(resume):
    """--resume → (checkpoint paths, newest first; run directory). A run directory gives all of its checkpoints."""
    path = Path(resume)
    if path.is_dir():
        steps = checkpoint_steps(path / "checkpoints")
        if not steps:  # nothing to resume; a write cut short may have left a large temporary: remove it
            stale = sorted((path / "checkpoints").glob(".*.tmp"))
            for tmp in stale:
                tmp.unlink(missing_ok=True)  # under torchrun, every rank tries
            raise UserError(f"--resume {path}: no checkpoints in {path / 'checkpoints'} (it stopped before its first)"
                            + "".join(f"; removed {tmp.name}, the temporary of a write cut short" for tmp in stale))
        return [path / "checkpoints" / f"{s:07d}.pt" for s in reversed(steps)], path
    if not path.is_file():
        raise UserError(f"--resume {path} is neither a run directory nor a checkpoint file")
    if path.parent.name != "checkpoints":
        raise UserError(f"--resume {path}: a checkpoint is resumed inside its run (RUN_DIR/checkpoints/NNNNNNN.pt)")
    newer = [s for s in checkpoint_steps(path.parent) if path.stem.isdigit() and s > int(path.stem)]
    if newer:
        raise UserError(f"--resume {path}: the run has newer checkpoints ({', '.join(f'{s:07d}' for s in newer)}); "
                        f"resume from the newest, or move those away first")
    return [path], path.parent.parent


def load_checkpoint(resume, repair=False):
    """--resume → (checkpoint, its path, run directory, notes for the log). From a run directory, its newest
    checkpoint that loads. With `repair` (rank 0 of the run), one that does not (cut short, damaged) is renamed to
    NAME.damaged, kept for inspection but out of the way, and the temporaries of writes cut short are removed."""
    paths, run_dir = checkpoints_to_try(resume)
    notes = []
    for tmp in sorted((run_dir / "checkpoints").glob(".*.tmp")) if repair else []:
        tmp.unlink()
        notes.append(f"removed {tmp}, the temporary file of a checkpoint write cut short")
    for path in paths:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), path, run_dir, notes
        except Exception:  # torch's messages for a cut or damaged file neither name it nor say so
            if Path(resume).is_file():
                raise UserError(f"--resume {path} does not load as a checkpoint (cut short or damaged)") from None
            if repair:
                path.rename(path.with_name(path.name + ".damaged"))
                notes.append(f"{path} does not load (cut short or damaged): set aside as {path.name}.damaged")
    raise UserError(f"--resume {resume}: none of the checkpoints in {run_dir / 'checkpoints'} loads")
