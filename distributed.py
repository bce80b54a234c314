"""The torchrun set-up the scripts share: one process per GPU under torchrun, or one process without it."""
import os

import torch
import torch.distributed as dist


def init_distributed():
    """(rank, world_size, device) of this process.

    Under torchrun it joins the process group (NCCL on GPUs, gloo on CPUs) and takes its GPU from LOCAL_RANK:
    the global rank would index past the GPUs of a node on the second node (DiT #79, SiT #8). Without torchrun
    it is rank 0 of 1, on CUDA if present, else on the CPU.
    """
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def close_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()
