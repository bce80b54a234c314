"""CPU checks of curves.py: the panel grid of two runs, the milestone figure, reading a run cut short."""
import json
import math

import numpy as np
import pytest
from PIL import Image

import curves
import train
from curves import COLUMNS, GAP, LABEL_W, LEGEND_H, MIN_CELL, PALETTE, PANEL_H, PANEL_W

TERMS_OFF = {term: 0.0 for term in train.LOGGED}  # what a run logs for a term it does not use


def fabricated_runs():
    """A SiT run (no L_div: its terms and w logged as 0.0) and a DiverseDiT run, both evaluated by FID and IS."""
    g = np.random.default_rng(0)
    runs = {}
    for label, diverse in (("SiT", False), ("DiverseDiT", True)):
        metrics = []
        for step in range(100, 2100, 100):
            loss = 1 / math.sqrt(step) + 0.01 * g.random()
            metrics.append({"step": step, **TERMS_OFF, "loss": loss, "fm": loss * 0.9, "grad_norm": 1 + g.random(),
                            "steps_per_sec": 5.0, "img_per_sec": 320.0})
            if diverse:
                metrics[-1].update(div=0.4 - step / 1e4, div_orth=0.2, div_mi=0.5 - step / 1e4, div_disp=-0.1,
                                   w=0.6 + 0.1 * g.random())
        evals = [{"step": step, "num_samples": 100, "fid": 80 - step / 50 - 5 * diverse,
                  "inception_score": step / 100 + diverse} for step in (500, 1000, 2000)]
        runs[label] = {"metrics": metrics, "eval": evals}
    return runs


def colours_in(pixels):
    return {tuple(c) for c in pixels.reshape(-1, 3).tolist()}


def test_curves_draw_a_panel_per_quantity_logged_and_one_colour_per_run(tmp_path):
    drawn = curves.draw_curves(fabricated_runs(), tmp_path / "curves.png")
    assert drawn == ["loss", "fm", "div", "div_orth", "div_mi", "div_disp", "w", "grad_norm", "fid", "inception_score"]
    pixels = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB"))
    rows = -(-len(drawn) // COLUMNS)
    assert pixels.shape == (LEGEND_H + rows * PANEL_H, COLUMNS * PANEL_W, 3)

    def panel(i):
        top, left = LEGEND_H + (i // COLUMNS) * PANEL_H, (i % COLUMNS) * PANEL_W
        return pixels[top:top + PANEL_H, left:left + PANEL_W]

    sit, diverse_dit = PALETTE[0], PALETTE[1]
    for quantity in ("loss", "grad_norm", "fid"):  # both runs, one curve each
        assert {sit, diverse_dit} <= colours_in(panel(drawn.index(quantity)))
    for quantity in ("div", "div_orth", "div_mi", "div_disp", "w"):  # SiT's zeros draw nothing
        colours = colours_in(panel(drawn.index(quantity)))
        assert diverse_dit in colours and not set(PALETTE) - {diverse_dit} & colours
    assert {sit, diverse_dit} <= colours_in(pixels[:LEGEND_H])  # the legend, once at the top
    for i in range(len(drawn), rows * COLUMNS):  # the grid's empty slots stay blank
        assert (panel(i) == 255).all()
    curves.draw_curves(fabricated_runs(), tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "curves.png").read_bytes()  # deterministic


def test_bias_corrected_ema_of_a_constant_is_that_constant():
    steps, values = curves.series([{"step": s, "loss": 2.0} for s in (1, 2, 3)], "loss", smooth=True)
    np.testing.assert_allclose(values, 2.0)
    assert curves.series([{"step": 1, "div": 0.0}], "div", smooth=True) is None


def test_the_training_quantities_are_those_train_logs():
    assert curves.TRAINING == train.LOGGED


def test_milestones_are_rows_of_upscaled_cells(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 16, 16, 3), dtype=np.uint8)  # 3 rows of 4 16-px images
    curves.draw_milestones([(step, images[i]) for i, step in enumerate((1000, 2000, 4000))], tmp_path / "m.png")
    pixels = np.asarray(Image.open(tmp_path / "m.png").convert("RGB"))
    factor = MIN_CELL // 16
    cell = 16 * factor
    assert pixels.shape == (3 * (cell + GAP) - GAP, LABEL_W + 4 * (cell + GAP) - GAP, 3)
    for i in range(3):
        for j in range(4):
            y, x = i * (cell + GAP), LABEL_W + j * (cell + GAP)
            np.testing.assert_array_equal(pixels[y:y + cell, x:x + cell],
                                          images[i, j].repeat(factor, axis=0).repeat(factor, axis=1))
    assert (pixels[cell:cell + GAP, LABEL_W:] == 255).all()  # the white gap below the first row
    with pytest.raises(ValueError, match="one shape"):
        curves.draw_milestones([(1, images[0]), (2, images[0, :2])], tmp_path / "bad.png")


def test_read_run_skips_a_last_line_cut_short(tmp_path):
    lines = [json.dumps({"step": s, "loss": 0.5}) for s in (100, 200)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 300, "lo')
    assert curves.read_run(tmp_path) == {"metrics": [{"step": 100, "loss": 0.5}, {"step": 200, "loss": 0.5}],
                                         "eval": []}
    (tmp_path / "eval.jsonl").write_text('{"step": 1, "fi\n' + lines[0] + "\n")
    with pytest.raises(ValueError, match="eval.jsonl, line 1"):  # cut short before the end: not an interruption
        curves.read_run(tmp_path)
