"""Pictures of training runs, with PIL and numpy only (no plotting library to install, no torch to import):

    draw_curves({"SiT": read_run("results/000-…"), "DiverseDiT": read_run("results/001-…")}, "curves.png")
    draw_milestones([(step, images), …], "milestones.png")
"""
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# train.LOGGED (repeated: train.py imports torch), then what evaluate.py appends to eval.jsonl; in panel order
TRAINING = ("loss", "fm", "mf_mse", "repa", "div", "div_orth", "div_mi", "div_disp", "w", "disploss", "sra",
            "grad_norm")
EVALUATION = ("fid", "sfid", "inception_score", "precision", "recall", "frechet_distance", "accuracy")
LOG_Y = {"loss", "fm", "mf_mse", "grad_norm"}  # positive and spanning decades: a log y axis (unless one is ≤ 0)
EMA_DECAY = 0.9  # smoothing of the training terms, over logged points
# tab10 without its grey (antialiased text is grey): run k is drawn in PALETTE[k % 9] in every panel
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (188, 189, 34), (23, 190, 207))
COLUMNS, PANEL_W, PANEL_H, LEGEND_H = 4, 320, 200, 24  # a grid of panels below one line of legend
PLOT = (64, 22, 12, 20)  # the plot box's margins inside a panel, left, top, right, bottom: y values, title, steps
MIN_CELL, GAP, LABEL_W = 64, 2, 80  # draw_milestones: least cell side, white gap, width of the step column


def read_run(run_dir):
    """{"metrics": the records of metrics.jsonl, "eval": those of eval.jsonl ([] if absent)}."""
    run_dir = Path(run_dir)
    return {"metrics": read_jsonl(run_dir / "metrics.jsonl"),
            "eval": read_jsonl(run_dir / "eval.jsonl") if (run_dir / "eval.jsonl").is_file() else []}


def read_jsonl(path):
    lines = path.read_text().splitlines()
    records = []
    for k, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if k < len(lines) - 1:  # only the last line can be cut short by an interrupted run: skipped
                raise ValueError(f"{path}, line {k + 1}: not JSON") from None
    return records


def series(rows, quantity, smooth):
    """(steps, values) of the rows that log `quantity` as a finite number, smoothed if `smooth`; None if there are
    none or all are zero (a term that a run does not use is logged as 0.0: no flat line at zero)."""
    points = [(r["step"], r[quantity]) for r in rows
              if isinstance(r.get(quantity), (int, float)) and math.isfinite(r[quantity])]
    if not any(value for _, value in points):
        return None
    steps, values = np.array(points, dtype=np.float64).T
    if smooth:  # s_k = β·s_{k−1} + (1 − β)·v_k from s_0 = 0, divided by 1 − β^k (Adam's bias correction)
        s, smoothed = 0.0, []
        for k, value in enumerate(values, 1):
            s = EMA_DECAY * s + (1 - EMA_DECAY) * value
            smoothed.append(s / (1 - EMA_DECAY ** k))
        values = np.array(smoothed)
    return steps, values


def draw_curves(runs, path):
    """One PNG, under a legend of `runs` ({label: read_run(…)}): a panel against step per quantity some run logs, not
    all zero; returns the quantities drawn, in panel order (none: only the legend). Training terms are smoothed
    (`series`), those in LOG_Y on a log y axis; evaluation scores are drawn as they are, a marker per checkpoint."""
    panels = {}  # quantity: [(colour, steps, values)], one per run that has it
    for quantity in TRAINING + EVALUATION:
        source = "metrics" if quantity in TRAINING else "eval"
        for k, run in enumerate(runs.values()):
            if (s := series(run[source], quantity, smooth=quantity in TRAINING)) is not None:
                panels.setdefault(quantity, []).append((PALETTE[k % len(PALETTE)], *s))
    font = ImageFont.load_default()
    lefts = np.cumsum([8] + [32 + math.ceil(font.getlength(label)) for label in runs]).tolist()  # legend entries
    image = Image.new("RGB", (max(min(COLUMNS, len(panels)) * PANEL_W, lefts[-1]),
                              LEGEND_H + -(-len(panels) // COLUMNS) * PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    for k, (x, label) in enumerate(zip(lefts, runs)):  # a swatch and the label, left to right
        draw.rectangle((x, 6, x + 11, 17), fill=PALETTE[k % len(PALETTE)])
        draw.text((x + 16, 12), label, fill="black", font=font, anchor="lm")
    for i, (quantity, curves) in enumerate(panels.items()):
        draw_panel(draw, font, (i % COLUMNS) * PANEL_W, LEGEND_H + (i // COLUMNS) * PANEL_H, quantity, curves)
    save(image, path)
    return list(panels)


def draw_panel(draw, font, left, top, quantity, curves):
    x0, y0, x1, y1 = left + PLOT[0], top + PLOT[1], left + PANEL_W - PLOT[2], top + PANEL_H - PLOT[3]
    steps, values = (np.concatenate(c) for c in zip(*(curve[1:] for curve in curves)))
    log = quantity in LOG_Y and values.min() > 0
    transform = np.log10 if log else np.asarray
    s_lo, s_hi, v_lo, v_hi = steps.min(), steps.max(), values.min(), values.max()

    def fraction(a, lo, hi):  # of the way along an axis; one value (to rounding: an EMA of one) in the middle
        return (a - lo) / (hi - lo) if hi - lo > 1e-9 * (abs(hi) + abs(lo)) else np.full_like(a, 0.5)

    for colour, s, v in curves:  # 3 px inside the box, so that markers stay in it
        xs = x0 + 3 + fraction(s, s_lo, s_hi) * (x1 - x0 - 6)
        ys = y1 - 3 - fraction(transform(v), transform(v_lo), transform(v_hi)) * (y1 - y0 - 6)
        points = list(zip(xs.tolist(), ys.tolist()))
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        if quantity in EVALUATION or len(points) == 1:
            for x, y in points:
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    title = quantity + (", EMA" if quantity in TRAINING else "") + (", log y" if log else "")
    draw.text((left + PANEL_W // 2, top + 4), title, fill="black", font=font, anchor="mt")
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    draw.text((x0 - 4, y0), f"{v_hi:.4g}", fill="black", font=font, anchor="rt")
    draw.text((x0 - 4, y1), f"{v_lo:.4g}", fill="black", font=font, anchor="rb")
    draw.text((x0, y1 + 4), f"{s_lo:.0f}", fill="black", font=font, anchor="lt")
    draw.text((x1, y1 + 4), f"{s_hi:.0f}", fill="black", font=font, anchor="rt")


def draw_milestones(rows, path):
    """One PNG, a row per (step, images (n, H, W, 3) uint8) of `rows`, the same noise and labels at each step (the
    paper's samples at different iterations); small images enlarged by an integer factor (nearest neighbour)."""
    shape = rows[0][1].shape
    if any(images.shape != shape for _, images in rows):
        raise ValueError(f"every milestone needs images of one shape, got {[images.shape for _, images in rows]}")
    n, H, W, _ = shape
    factor = -(-MIN_CELL // min(H, W))  # ceil, 1 for images of MIN_CELL px or more
    image = Image.new("RGB", (LABEL_W + n * (W * factor + GAP) - GAP, len(rows) * (H * factor + GAP) - GAP), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for i, (step, images) in enumerate(rows):
        y = i * (H * factor + GAP)
        draw.text((LABEL_W - 6, y + H * factor // 2), f"step {step}", fill="black", font=font, anchor="rm")
        for j, sample in enumerate(images):
            cell = sample.repeat(factor, axis=0).repeat(factor, axis=1)  # (H·factor, W·factor, 3)
            image.paste(Image.fromarray(cell), (LABEL_W + j * (W * factor + GAP), y))
    save(image, path)


def save(image, path):
    from runtime import replace_atomically  # here, not at the top: runtime imports torch, which drawing does not need
    with replace_atomically(path) as tmp:
        image.save(tmp, format="PNG")
