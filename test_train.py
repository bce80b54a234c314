"""CPU checks of train.py: exact resume, the loss line, fault handling, bad input, DDP, the README quick start."""
import io
import itertools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import runtime
import train
from runtime import UserError
from data import InfiniteSampler
from train import parse_args

TINY_RUN = ["--model", "SiT-Tiny/4", "--data-path", "builtin:shapes", "--builtin-image-size", "16",
            "--global-batch-size", "8", "--num-workers", "0", "--log-every", "2", "--sample-every", "0"]


class StandInEncoder(nn.Module):
    """REPA's target interface (uint8 images → (N, T, Z) tokens, `embed_dim`) on a tiny random network: the
    patch grid of SiT-Tiny/4 on 16-px images (4×4 tokens) from average-pooled pixels."""

    embed_dim = 12

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, self.embed_dim)

    def forward(self, images):
        pooled = F.adaptive_avg_pool2d(images.float() / 255, 4)  # (N, 3, 4, 4)
        return self.proj(pooled.flatten(2).transpose(1, 2))      # (N, 16, Z)


@pytest.fixture
def stand_in_encoder(monkeypatch):
    """encoders.load_encoders with a StandInEncoder for each encoder name, the same one for a repeated name."""
    def load_encoders(names, image_size, num_tokens, weights_dir):
        for name in names:
            torch.manual_seed(sum(map(ord, name)))
            loaded.setdefault(name, StandInEncoder().requires_grad_(False))
        return [loaded[name] for name in names]
    loaded = {}
    monkeypatch.setattr(train, "check_encoder", lambda *args: None)  # the real check refuses 16-px images
    monkeypatch.setattr(train, "load_encoders", load_encoders)
    return loaded


def run(tmp_path, *flags):
    train.main(parse_args(TINY_RUN + ["--results-dir", str(tmp_path)] + list(flags)))
    return sorted(p for p in tmp_path.iterdir() if p.is_dir())[-1]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    opt_a, opt_b = a["opt"]["state"], b["opt"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for name in opt_a[i]:
            assert torch.equal(opt_a[i][name], opt_b[i][name]), f"opt.{i}.{name}"


ALL_SWITCHES = ["--diverse", "--disploss", "--sra", "--sra-student-block", "2", "--sra-teacher-block", "6",
                "--repa", "--encoder-depth", "3"]


def test_resume_gives_bit_identical_model_ema_and_optimizer(tmp_path, stand_in_encoder):
    straight = run(tmp_path / "a", *ALL_SWITCHES, "--max-steps", "6", "--save-every", "3")
    half = run(tmp_path / "b", *ALL_SWITCHES, "--max-steps", "3", "--save-every", "3")
    train.main(parse_args(TINY_RUN + ALL_SWITCHES + ["--max-steps", "6", "--save-every", "3", "--resume", str(half)]))
    a, b = load(straight / "checkpoints" / "0000006.pt"), load(half / "checkpoints" / "0000006.pt")
    assert a["steps"] == b["steps"] == 6
    assert_same_state(a, b)
    metrics = [json.loads(line) for line in (half / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 3, 4, 6]  # 3: the end of the first run; then 4 and 6
    assert all(m["repa"] != 0 and m["sra"] != 0 and m["disploss"] != 0 and m["div"] != 0 for m in metrics)


@pytest.mark.parametrize("switches", [
    ["--diverse", "--diversity-terms", "mi", "--diversity-layers", "all", "--constant-weight", "--repa",
     "--enc-type", "dinov2-vit-b,mae-vit-b", "--encoder-depth", "2,4"],
    ["--diverse", "--diversity-terms", "orth,disp", "--diversity-layers", "3", "--adaptive-range", "0.2", "0.7",
     "--repa", "--enc-type", "mocov3-vit-b", "--encoder-depth", "1,3,5"],
])
def test_the_ablation_switches_train_and_resume_exactly(tmp_path, stand_in_encoder, switches):
    straight = run(tmp_path / "a", *switches, "--max-steps", "4", "--save-every", "2")
    half = run(tmp_path / "b", *switches, "--max-steps", "2", "--save-every", "2")
    train.main(parse_args(["--resume", str(half), "--max-steps", "4"]))  # the switches come from the checkpoint
    a, b = load(straight / "checkpoints" / "0000004.pt"), load(half / "checkpoints" / "0000004.pt")
    assert_same_state(a, b)
    projectors = {key.split(".")[1] for key in a["model"] if key.startswith("projectors.")}
    assert len(a["args"]["enc_type"]) == len(a["args"]["encoder_depth"]) == len(projectors)
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(m["repa"] != 0 and m["div"] != 0 for m in metrics)
    if "--constant-weight" in switches:
        assert all(m["w"] == 1 for m in metrics)


def test_bad_ablation_settings_are_refused_before_any_work(tmp_path):
    for flags, message in [(["--diverse", "--diversity-terms", ""], "choose one or more of orth,mi,disp"),
                           (["--diverse", "--diversity-terms", "orth,entropy"], "choose one or more of"),
                           (["--repa", "--encoder-depth", "2,9"], "--encoder-depth 9 is not a block of SiT-Tiny/4"),
                           (["--repa", "--enc-type", "dinov2-vit-b,mae-vit-b,mocov3-vit-b", "--encoder-depth", "1,2"],
                            "names 3 encoders and"),
                           (["--repa", "--enc-type", "dino", "--encoder-depth", "2"], "unknown encoder 'dino'"),
                           (["--diverse", "--repa", "--encoder-depth", "2", "--diversity-layers", "1"],
                            "pair rule starts at block 1 − encoder_depth − 1 = -2 .*: choose another --encoder-depth")]:
        with pytest.raises(UserError, match=message):
            run(tmp_path, *flags)
        assert list(tmp_path.iterdir()) == []


def test_a_resume_across_an_epoch_boundary_sees_the_same_data(tmp_path):
    # 40 images, batch 8: 5 batches per epoch; stop after 4, resume, cross into epoch 2
    flags = ["--builtin-num-images", "40", "--max-steps", "8", "--save-every", "4"]
    straight = run(tmp_path / "a", *flags)
    half = run(tmp_path / "b", "--builtin-num-images", "40", "--max-steps", "4", "--save-every", "4")
    train.main(parse_args(TINY_RUN + flags + ["--resume", str(half / "checkpoints" / "0000004.pt")]))
    a, b = load(straight / "checkpoints" / "0000008.pt"), load(half / "checkpoints" / "0000008.pt")
    assert a["steps"] == b["steps"] == 8  # epoch 1, batch 3: the data position follows from the steps
    assert_same_state(a, b)


def test_resume_needs_only_the_run_directory_and_refuses_changed_settings(tmp_path):
    first = run(tmp_path, "--diverse", "--max-steps", "2", "--save-every", "2")
    train.main(parse_args(["--resume", str(first), "--max-steps", "4"]))  # every other flag from the run
    assert load(first / "checkpoints" / "0000004.pt")["args"]["long_residual"]
    with pytest.raises(ValueError, match="global_seed: 0 in the checkpoint, 1 now"):
        train.main(parse_args(["--resume", str(first), "--max-steps", "6", "--global-seed", "1"]))
    with pytest.raises(ValueError, match="newer checkpoints \\(0000004\\)"):
        parse_args(["--resume", str(first / "checkpoints" / "0000002.pt")])


def test_metrics_lines_after_the_checkpoint_and_a_cut_line_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2}\n{"step": 4}\n{"step": 6}\n{"ste')
    runtime.truncate_metrics(path, 4)
    assert path.read_text() == '{"step": 2}\n{"step": 4}\n'


def test_the_total_loss_is_the_papers_line():
    terms = {"fm": torch.tensor(1.0), "repa": torch.tensor(-0.6), "w": torch.tensor(0.3), "div": torch.tensor(0.2),
             "disploss": torch.tensor(-2.0), "sra": torch.tensor(0.4)}
    args = parse_args(TINY_RUN)
    expected = 1.0 + 0.5 * -0.6 + 0.3 * 0.2 + 0.25 * -2.0 + 0.2 * 0.4
    torch.testing.assert_close(train.total_loss(terms, args), torch.tensor(expected))


def test_training_writes_the_dit_layout(tmp_path):
    run_dir = run(tmp_path, "--diverse", "--max-steps", "4", "--save-every", "2", "--keep-last", "1",
                  "--ckpt-every", "4", "--sample-every", "4")
    assert run_dir.name == "000-SiT-Tiny-4-diverse"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["0000004.pt"]  # 2 pruned
    assert (run_dir / "samples" / "0000004.png").is_file() and "saved" in (run_dir / "log.txt").read_text()
    log = (run_dir / "log.txt").read_text()
    assert "sampling the EMA preview grid (32 images, 50 steps)" in log
    assert log.count("EMA decay 0.9999 averages over about 10,000 steps, more than this run's 4") == 1
    record = json.loads((run_dir / "args.json").read_text())
    assert record["long_residual"] and record["diversity_loss"] and record["versions"]["torch"] == torch.__version__
    assert "code" in record and record["data_kind"] == "pixel"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    assert {"loss", "fm", "div", "div_orth", "div_mi", "div_disp", "w", "grad_norm", "img_per_sec"} <= metrics[0].keys()
    assert run(tmp_path, "--max-steps", "1").name == "001-SiT-Tiny-4-sit"


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = []

    def flow_matching_loss(v_pred, v):
        calls.append(1)
        loss = ((v_pred - v) ** 2).mean(dim=(1, 2, 3))
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train, "flow_matching_loss", flow_matching_loss)
    with pytest.raises(FloatingPointError, match=r"non-finite loss, fm, grad_norm at step 3.*0000002.pt\) is intact"):
        run(tmp_path, "--max-steps", "6", "--save-every", "2", "--log-every", "4")
    run_dir = next(tmp_path.iterdir())
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["0000002.pt"]
    assert all(torch.isfinite(v).all() for v in load(run_dir / "checkpoints" / "0000002.pt")["model"].values())


def test_bad_input_is_refused_before_training(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown model 'SiT-M/2'"):
        run(tmp_path, "--model", "SiT-M/2")
    with pytest.raises(UserError, match="not a prepared dataset"):
        run(tmp_path, "--data-path", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        runtime.local_batch_size(256, 3)
    with pytest.raises(ValueError, match="give --encoder-depth"):
        run(tmp_path, "--repa")
    with pytest.raises(ValueError, match="--disploss-block 9 is not a block of SiT-Tiny/4"):
        run(tmp_path, "--disploss", "--disploss-block", "9")
    first = run(tmp_path, "--max-steps", "2", "--save-every", "2")
    with pytest.raises(ValueError, match="other settings: long_residual: False in the checkpoint, True now"):
        run(tmp_path, "--diverse", "--max-steps", "4", "--resume", str(first))
    with pytest.raises(ValueError, match="model: 'SiT-Tiny/4' in the checkpoint, 'SiT-S/4' now"):
        run(tmp_path, "--model", "SiT-S/4", "--max-steps", "4", "--resume", str(first))
    with pytest.raises(UserError, match="neither a run directory nor a checkpoint"):
        run(tmp_path, "--resume", str(tmp_path / "missing.pt"))


def test_a_user_error_is_one_line_from_the_command_line(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "0000002.pt").write_bytes(os.urandom(1000))
    for flags, message in [(["--model", "SiT-M/2"], "unknown model 'SiT-M/2'"),
                           (["--resume", str(tmp_path / "checkpoints" / "0000002.pt")], "does not load")]:
        result = subprocess.run([sys.executable, "train.py", *TINY_RUN, "--results-dir", str(tmp_path), *flags],
                                cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
        assert result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]  # no run folder for a refused run


DAMAGE = {"truncated": lambda data: data[:len(data) // 2], "empty": lambda data: b"",
          "random bytes": lambda data: os.urandom(len(data))}


def test_a_damaged_checkpoint_is_named_set_aside_and_the_run_resumes_from_the_one_before(tmp_path):
    first = run(tmp_path, "--max-steps", "4", "--save-every", "2")
    folder = first / "checkpoints"
    good = (folder / "0000004.pt").read_bytes()
    for kind, damage in DAMAGE.items():
        (folder / "0000004.pt").write_bytes(damage(good))
        with pytest.raises(UserError, match=f"--resume {folder / '0000004.pt'} does not load as a checkpoint"):
            parse_args(["--resume", str(folder / "0000004.pt")])
        assert parse_args(["--resume", str(first)]).max_steps == 4  # the defaults from 0000002.pt, nothing moved
        assert (folder / "0000004.pt").is_file(), kind
    (folder / ".0000006.pt.tmp").write_bytes(b"a write cut short")
    train.main(parse_args(["--resume", str(first), "--max-steps", "4"]))
    log = (first / "log.txt").read_text()
    assert f"{folder / '0000004.pt'} does not load (cut short or damaged): set aside as 0000004.pt.damaged" in log
    assert f"removed {folder / '.0000006.pt.tmp'}" in log and f"resumed from {folder / '0000002.pt'} at step 2" in log
    assert sorted(p.name for p in folder.iterdir()) == ["0000002.pt", "0000004.pt", "0000004.pt.damaged"]
    assert_same_state(load(folder / "0000004.pt"), torch.load(io.BytesIO(good), weights_only=True))
    (folder / "0000002.pt").write_bytes(b"")
    (folder / "0000004.pt").write_bytes(b"")
    with pytest.raises(UserError, match=f"none of the checkpoints in {folder} loads"):
        runtime.load_checkpoint(str(first), repair=True)
    assert sorted(p.name for p in folder.iterdir()) == ["0000002.pt.damaged", "0000004.pt.damaged"]


def test_a_run_killed_before_its_first_checkpoint_loses_its_temporary_on_resume(tmp_path):
    folder = tmp_path / "000-SiT-B-2-sit" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / ".0000010.pt.tmp").write_bytes(b"a write cut short")
    with pytest.raises(UserError, match="no checkpoints in .*; removed .0000010.pt.tmp, the temporary of a write"):
        runtime.checkpoints_to_try(folder.parent)
    assert list(folder.iterdir()) == []


def test_a_full_disk_names_the_checkpoint_kept_and_leaves_no_temporary(small_disk):
    runtime.save_checkpoint_file({"w": torch.zeros(10)}, small_disk / "0000002.pt")
    with pytest.raises(UserError, match=f"^no space left while writing {small_disk / '0000004.pt'}; the last "
                                        f"checkpoint \\({small_disk / '0000002.pt'}\\) is intact$"):
        runtime.save_checkpoint_file({"w": torch.zeros(1_000_000)}, small_disk / "0000004.pt")
    assert [p.name for p in small_disk.iterdir()] == ["0000002.pt"]


def test_meanflow_logs_its_unweighted_squared_error(monkeypatch):
    u_pred, u_target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    monkeypatch.setattr(train, "meanflow_prediction", lambda *args: (u_pred, u_target, None))
    args = train.resolve_args(parse_args(TINY_RUN + ["--meanflow"]))
    x, y = torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)
    terms = train.training_losses(None, x, y, meanflow=(None, args))
    torch.testing.assert_close(terms["mf_mse"], ((u_pred - u_target) ** 2).mean())
    assert "mf_mse" in train.LOGGED and terms["fm"] < 1  # fm: the weighted loss, l2 / (l2 + c)


def test_help_shows_every_default():
    text = " ".join(train.build_parser().format_help().split())
    assert "(the paper's Tables 1, 4, 6–9) (default: 400000)" in text
    assert "constant (the paper, REPA) (default: 0.0001)" in text
    assert "(default: None)" not in text  # those defaults are decided at run time, as their help says


def test_repa_needs_images_and_real_runs_need_dinov2_sized_images(tmp_path):
    with pytest.raises(ValueError, match="256 or 512 px"):
        run(tmp_path, "--repa", "--encoder-depth", "2")  # the real loader: 16-px shapes are refused
    assert list(tmp_path.iterdir()) == []  # before the run folder is made
    with pytest.raises(ValueError, match="fewer than one global batch"):
        run(tmp_path, "--builtin-num-images", "4")
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "dataset.json").write_text(json.dumps({"format": 1, "images": False, "classes": ["a"],
                                                                    "image_size": 256}))
    import numpy as np
    np.save(tmp_path / "prepared" / "status.npy", np.ones(1, dtype=np.uint8))
    with pytest.raises(ValueError, match="--no-images"):
        run(tmp_path, "--repa", "--encoder-depth", "2", "--data-path", str(tmp_path / "prepared"))


def test_the_sampler_deals_disjoint_batches_and_starts_after_what_was_trained():
    def take(sampler, n):
        return list(itertools.islice(sampler, n))

    epoch0 = [take(InfiniteSampler(50, 4, rank, 3, seed=7), 16) for rank in range(3)]
    assert len(set(sum(epoch0, []))) == 48  # 4 batches of 4 per rank, disjoint
    assert take(InfiniteSampler(50, 4, 1, 3, seed=7, start=2), 8) == epoch0[1][8:]
    epoch1 = take(InfiniteSampler(50, 4, 1, 3, seed=7, start=4), 16)
    assert take(InfiniteSampler(50, 4, 1, 3, seed=7), 32) == epoch0[1] + epoch1  # endless, from epoch to epoch
    assert epoch1 != epoch0[1]  # a new order each epoch
    one_rank = take(InfiniteSampler(50, 12, 0, 1, seed=7, start=1), 12)  # the same global batch on one process
    assert sorted(one_rank) == sorted(sum((e[4:8] for e in epoch0), []))


def test_two_ranks_keep_identical_weights(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               *TINY_RUN, "--diverse", "--max-steps", "4", "--save-every", "2", "--results-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = next(tmp_path.iterdir()) / "log.txt"
    assert log.read_text().count("weights identical across 2 rank(s)") == 2
    assert "2 process(es) × batch 4" in log.read_text()


def test_the_readme_quick_start_command_runs(tmp_path):
    readme = (Path(__file__).parent / "README.md").read_text()
    section = readme[readme.index("## Quick start"):]
    command = next(line for line in section.splitlines() if line.startswith("python train.py"))
    argv = shlex.split(command.split("#")[0])[2:]
    train.main(parse_args(argv + ["--max-steps", "10", "--sample-every", "10", "--results-dir", str(tmp_path)]))
    run_dir = next(tmp_path.iterdir())
    assert (run_dir / "checkpoints" / "0000010.pt").is_file() and (run_dir / "samples" / "0000010.png").is_file()
