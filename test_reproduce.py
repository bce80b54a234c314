"""REPRODUCE.md cannot drift from the code: every command parses with its script's own parser, and each row's
sample command reads the checkpoint its train command writes, and its fid command the batch the sample writes."""
import re
import shlex
from pathlib import Path

import pytest

import analysis
import fid
import runtime
import sample
import train

DOC = (Path(__file__).parent / "REPRODUCE.md").read_text()
PREFIXES = dict(re.findall(r'^(\w+)="(.*)"$', DOC, flags=re.M))
ROWS = [[cell.strip() for cell in line.strip("|").split("|")] for line in DOC.splitlines()
        if line.startswith("| ") and line.count("`") == 6]  # table, row, FID, train, sample, fid
PAPER_ROWS = {"1": 12, "2": 2, "3": 2, "4": 6, "5": 1, "6": 6, "7": 4, "8": 4, "9": 4, "A2": 20, "A3": 12, "A4": 24,
              "A5": 12, "A6": 8, "A7": 6, "A8": 4, "A9": 4, "A10": 5}  # each table's rows in the paper


def command(cell):
    """`$T --flag …` → (script, its argv), the prefix expanded."""
    words = shlex.split(cell.strip("`"))
    words = PREFIXES[words[0][1:]].split() + words[1:] if words[0].startswith("$") else words
    script = next(i for i, word in enumerate(words) if word.endswith(".py"))
    return words[script], words[script + 1:]


def test_every_row_of_the_paper_has_its_commands():
    counts = {}
    for table, *_ in ROWS:
        counts[table] = counts.get(table, 0) + 1
    assert counts == PAPER_ROWS


@pytest.mark.parametrize("table, row, paper_fid, train_cell, sample_cell, fid_cell", ROWS,
                         ids=[f"{r[0]}: {r[1]}" for r in ROWS])
def test_a_row_trains_samples_and_evaluates_one_run(table, row, paper_fid, train_cell, sample_cell, fid_cell):
    script, argv = command(train_cell)
    assert script == "train.py"
    trained = train.resolve_args(train.parse_args(argv))
    size = re.search(r"(?:SiT|REPA|MF)-(XL|L|B)", row)
    assert trained.model == f"SiT-{size.group(1) if size else 'XL'}/2"  # Tables 2, 3: the paper's XL
    blocks = re.search(r"\[([\d,]+)\]|\bd(\d+)", row)
    if blocks:  # the row's aligned blocks; otherwise REPA's rows resolve to the paper's Table A1 depth
        assert set(trained.encoder_depth) == {int(b) for b in (blocks.group(1) or blocks.group(2)).split(",")}
    elif trained.repa:
        assert trained.encoder_depth == [train.ENCODER_DEPTH[trained.model[4:-2]]]
    assert ("MAE" in row) == ("mae-vit-b" in (trained.enc_type or []))
    assert ("MoCo" in row) == ("mocov3-vit-b" in (trained.enc_type or []))
    assert ("ours" in row or "full" in row) <= (trained.long_residual and trained.diversity_loss)

    script, argv = command(sample_cell)
    assert script == "sample.py"
    sampled = sample.build_parser().parse_args(argv)
    ckpt = Path(sampled.ckpt)
    assert ckpt.parent.parent.name == f"NNN-{runtime.run_folder_name(trained)}"
    step = int(ckpt.stem)
    assert step == trained.max_steps or (step < trained.max_steps and step % trained.ckpt_every == 0)
    assert (sampled.sampler == "meanflow") == trained.meanflow

    script, argv = command(fid_cell)
    assert script == "fid.py"
    evaluated = fid.build_parser().parse_args(argv)
    sampled.num_steps = sampled.num_steps or sample.DEFAULT_STEPS[sampled.sampler]
    name = sample.run_name(sampled, {"model": trained.model, "in_channels": 4})
    assert evaluated.samples == f"{sampled.sample_dir}/{name}.npz"
    assert ("512" in evaluated.ref) == trained.data_path.endswith("512") and sampled.num_fid_samples == 50_000


def test_the_heatmap_commands_parse_and_name_milestones_the_runs_keep():
    cells = re.findall(r"`(python analysis\.py [^`]*)`", DOC)
    assert len(cells) == 4
    for cell in cells:
        script, argv = command(cell)
        for ckpt in analysis.build_parser().parse_args(argv).ckpt:
            assert int(Path(ckpt).stem) % 5000 == 0 and Path(ckpt).parent.name == "checkpoints"
