"""What the scripts share to run: the torchrun set-up, atomic file replacement, and the code version a run
records."""
import contextlib
import os
import subprocess
from pathlib import Path

import torch
import torch.distributed as dist


def init_distributed(timeout=None):
    """(rank, world_size, device) of this process; `timeout` bounds each collective (torch's default if None).

    Under torchrun it joins the process group (NCCL on GPUs, gloo on CPUs) and takes its GPU from LOCAL_RANK:
    the global rank would index past the GPUs of a node on the second node (DiT #79, SiT #8). Without torchrun
    it is rank 0 of 1, on CUDA if present, else on the CPU.
    """
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


@contextlib.contextmanager
def replace_atomically(path):
    """Yield a temporary path beside `path` to write to; when the block ends without error, rename it over `path`.
    A run killed at any moment leaves either the old file or the new one, never a truncated file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    yield tmp
    os.replace(tmp, path)
