"""Fixtures shared by the tests: weight files written, from random initialisations, in the public formats."""
import json
import struct

import pytest
import torch

from vae import AutoencoderKL

def pytest_configure(config):
    # torch.func.jvp (MeanFlow's target) loads torch's own forward-AD decompositions, which call the deprecated
    # torch.jit.script once per process (torch 2.14): expected, and not this project's call to change.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:FutureWarning")


SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                     torch.bool: "BOOL"}


def write_safetensors(tensors, path, metadata=None):
    """A .safetensors file written by hand: u64 little-endian header length, JSON header, raw tensor bytes."""
    header = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        blob = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format pads its header to 8 bytes with spaces
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


@pytest.fixture(scope="session")
def sd_vae(tmp_path_factory):
    """(a random SD-VAE in eval mode, the folder holding its weights as diffusion_pytorch_model.safetensors)."""
    torch.manual_seed(0)
    vae = AutoencoderKL().eval().requires_grad_(False)
    for name, p in vae.named_parameters():  # norms away from (1, 0), so that their loading is tested too
        if "norm" in name:
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("sd-vae-ft-mse")
    write_safetensors(vae.state_dict(), folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    return vae, folder


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 512 KiB tmpfs, to run out of space in; skipped where mounting is not permitted (not root)."""
    import subprocess
    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)
