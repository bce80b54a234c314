"""What the scripts share to run: the torchrun set-up, one-line errors for the user's mistakes, atomic file
replacement, and the code version a run records."""
import contextlib
import ctypes
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def init_distributed(timeout=None):
    """(rank, world_size, device) of this process; `timeout` bounds each collective (torch's default if None).

    Under torchrun: NCCL on GPUs, gloo on CPUs, the GPU from LOCAL_RANK (the global rank would index past the GPUs
    of a node on the second node: DiT #79, SiT #8). Without torchrun: rank 0 of 1, on CUDA if present.
    """
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    exit_with_parent()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def exit_with_parent():
    """Ask Linux to send this process SIGTERM when its parent dies: a worker whose torchrun agent was killed would
    otherwise train on unsupervised. Elsewhere it does nothing."""
    if sys.platform == "linux":
        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)


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
    """Yield a temporary path beside `path` to write to; when the block ends without error, rename it over `path`
    and sync the folder (so that the rename survives a power cut): a run killed at any moment leaves the old file or
    the new one, never a truncated one. On an error the temporary file is removed; a full disk is reported as an
    OSError(ENOSPC) naming `path`."""
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
    sync_folder(path.parent)


def disk_full(error):
    """Whether `error` or an error it hides is ENOSPC: torch.save and PIL wrap the file's own OSError in theirs."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def sync_folder(folder):
    """fsync a folder, so that the names just created or renamed in it are on disk (where the OS allows it)."""
    with contextlib.suppress(OSError):  # some systems cannot open or sync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
