"""bench.py's GPU suite: its FLOP count against torch's counter, its whole code path on tiny sizes on the CPU (so that
it cannot rot before a GPU runs it), and its refusal without CUDA."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
from models import build_model

HERE = Path(__file__).parent


def test_forward_flops_is_what_torch_counts():
    """Every switch on (long residuals, two REPA projectors, SRA's head); the math attention, whose two products the
    counter sees (it does not count the CPU's fused kernel)."""
    torch.manual_seed(0)
    model = build_model("SiT-Tiny/2", input_size=8, num_classes=10, long_residual=True, z_dims=[32, 48],
                        encoder_depth=[2, 3], projector_dim=64, sra_depth=2)
    N = 3
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(N, 4, 8, 8), torch.rand(N), torch.randint(0, 10, (N,)), return_features=True)
    assert bench.forward_flops(model) == pytest.approx(counter.get_total_flops() / N, rel=0.01)


def test_forward_flops_of_the_papers_models():
    """DiT's Table 4 "Gflops" (multiply-adds, half our FLOPs) of B/2 and XL/2 at 256 px."""
    with torch.device("meta"):  # shapes only
        for name, gmacs in [("SiT-B/2", 23.01), ("SiT-XL/2", 118.64)]:
            assert bench.forward_flops(build_model(name)) / 2e9 == pytest.approx(gmacs, rel=1e-3)


def test_gpu_suite_smoke_runs_its_whole_code_path(tmp_path, capsys):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy CPU: more threads wait on each other
    try:
        bench.main(bench.build_parser().parse_args(["gpu", "--smoke", "--steps", "2", "--warmup", "0",
                                                    "--peak-tflops", "1", "--out", str(out)]))
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    rows = {row["measurement"]: row for row in report["rows"]}
    expected = ["compile health", *(f"SiT-Tiny/2 {variant}" for variant in bench.GPU_VARIANTS), "largest",
                "L_div alone", "sampling", "Inception features", "suite (FID, sFID, IS, precision / recall)"]
    for words in expected:
        assert any(words in measurement for measurement in rows), words
    assert len(rows) == 15  # health, 3 variants × 2, largest batch, L_div, 2 samplers × 2 precisions, 2 of fid.py
    assert rows[next(m for m in rows if "compile health" in m)]["figures"] == {"graph breaks": 0, "recompilations": 0}
    for row in report["rows"]:
        assert row["figures"] and row["target"].split(": ")[-1] in ("", "meets", "misses", "n/a")
        for unit, value in row["figures"].items():  # memory is the GPU's only; everything else a number
            assert (value is None) if unit == "GiB peak" else math.isfinite(value), (row["measurement"], unit)
    assert sum("% MFU" in row["figures"] for row in report["rows"]) == 7
    assert report["machine"]["bf16 peak TFLOP/s"] == 1
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[0] == "| measurement | figures | target |" and len(table) == 2 + len(rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_gpu_suite_without_cuda_says_so_in_one_line():
    done = subprocess.run([sys.executable, "bench.py", "gpu"], cwd=HERE, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: no CUDA device") and len(done.stderr.splitlines()) == 1
