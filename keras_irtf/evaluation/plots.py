"""The WHM sensitivity figure: weighted harmonic mean against alpha, one curve per run.

The GA paper plots WHM = (1 + alpha) Ms Mt / (alpha Mt + Ms) for alpha from 0 (WHM = Mt, the
test recall alone) upwards, to show how a ranking of methods depends on the weight given to the
training recall Ms. `write_whm_plot` draws that figure with Pillow (no plotting library needed)
and writes the numbers beside it:

    from keras_irtf.evaluation.plots import write_whm_plot
    write_whm_plot({"tirg": metrics_a, "tirg+ga": metrics_b}, "whm.png")
    # -> whm.png, whm.json (Ms, Mt and every curve point), whm.csv (alpha, one column per run)

`metrics_*` are the dicts `keras_irtf.evaluation.protocol.evaluate` returns (a run's metrics.json):
only their "whm" entry (Ms, Mt, ks) is used.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from keras_irtf.evaluation import metrics as M

# distinguishable on white and for the common colour-vision deficiencies (Okabe-Ito)
COLORS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233),
          (0, 0, 0), (240, 228, 66)]
DEFAULT_ALPHAS = tuple(np.round(np.linspace(0.0, 2.0, 41), 10))


def whm_curve(ms: float, mt: float, alphas=DEFAULT_ALPHAS) -> list:
    """WHM(Ms, Mt) at every alpha, by `keras_irtf.evaluation.metrics.weighted_harmonic_mean`."""
    return [M.weighted_harmonic_mean(ms, mt, float(a)) for a in alphas]


def whm_sensitivity(runs: dict, alphas=DEFAULT_ALPHAS) -> dict:
    """{"alphas": [...], "runs": [{"label", "Ms", "Mt", "ks", "whm": [...]}, ...]} from
    {label: metrics dict with a "whm" entry}."""
    if not runs:
        raise ValueError("whm_sensitivity needs at least one run")
    out = {"alphas": [float(a) for a in alphas], "runs": []}
    for label, metrics in runs.items():
        w = metrics.get("whm") if isinstance(metrics, dict) else None
        if not w or "Ms" not in w or "Mt" not in w:
            raise ValueError(
                f"run {label!r}: its metrics have no 'whm' entry with 'Ms' and 'Mt'; evaluate the run "
                "first (python tools/evaluate.py --run <folder>)"
            )
        ms, mt = float(w["Ms"]), float(w["Mt"])
        out["runs"].append({"label": str(label), "Ms": ms, "Mt": mt, "ks": list(w.get("ks", [])),
                            "whm": whm_curve(ms, mt, alphas)})
    return out


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _nice_step(span, max_ticks=8):
    raw = span / max_ticks
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def _decimals(step):
    n = 0
    while n < 6 and abs(round(step * 10**n) - step * 10**n) > 1e-6:
        n += 1
    return n


def draw_whm_plot(data: dict, path=None, title="WHM against alpha", size=(960, 600), mark_alpha=0.5):
    """Draw `whm_sensitivity(...)` data as a PNG (in percent, like the paper). Returns the image."""
    width, height = size
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    f_small, f_text, f_title = _font(13), _font(15), _font(18)
    left, right, top, bottom = 80, 30, 50, 130
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot box (y0 top)

    alphas = np.asarray(data["alphas"], float)
    curves = [100 * np.asarray(r["whm"], float) for r in data["runs"]]
    lo, hi = min(c.min() for c in curves), max(c.max() for c in curves)
    if hi - lo < 1e-9:
        lo, hi = lo - 1.0, hi + 1.0
    pad = 0.08 * (hi - lo)
    step = _nice_step(hi - lo + 2 * pad)
    ymin, ymax = math.floor((lo - pad) / step) * step, math.ceil((hi + pad) / step) * step
    xmin, xmax = float(alphas.min()), float(alphas.max())
    if xmax - xmin < 1e-12:
        xmin, xmax = xmin - 0.5, xmax + 0.5

    def px(a):
        return x0 + (a - xmin) / (xmax - xmin) * (x1 - x0)

    def py(v):
        return y1 - (v - ymin) / (ymax - ymin) * (y1 - y0)

    # grid, ticks and labels
    ndig = _decimals(step)
    v = ymin
    while v <= ymax + 1e-9:
        y = py(v)
        d.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        label = f"{v:.{ndig}f}"
        tw = d.textlength(label, font=f_small)
        d.text((x0 - 8 - tw, y - 8), label, fill="black", font=f_small)
        v += step
    xstep = _nice_step(xmax - xmin, 8)
    a = math.ceil(xmin / xstep) * xstep
    while a <= xmax + 1e-9:
        x = px(a)
        d.line([(x, y0), (x, y1)], fill=(235, 235, 235))
        label = f"{a:g}"
        d.text((x - d.textlength(label, font=f_small) / 2, y1 + 6), label, fill="black", font=f_small)
        a += xstep
    d.rectangle([x0, y0, x1, y1], outline="black")
    if mark_alpha is not None and xmin <= mark_alpha <= xmax:
        x = px(mark_alpha)
        for yy in range(int(y0), int(y1), 10):  # dashed: the alpha the paper reports
            d.line([(x, yy), (x, min(yy + 5, y1))], fill=(120, 120, 120), width=1)
        d.text((x + 4, y0 + 4), f"alpha = {mark_alpha:g}", fill=(90, 90, 90), font=f_small)

    xlabel = "alpha (weight of the training recall Ms)"
    d.text(((x0 + x1) / 2 - d.textlength(xlabel, font=f_text) / 2, y1 + 26), xlabel, fill="black", font=f_text)
    ylabel = "WHM (%)"
    label_img = Image.new("RGB", (int(d.textlength(ylabel, font=f_text)) + 4, 20), "white")
    ImageDraw.Draw(label_img).text((2, 0), ylabel, fill="black", font=f_text)
    label_img = label_img.rotate(90, expand=True)
    img.paste(label_img, (12, int((y0 + y1) / 2 - label_img.size[1] / 2)))
    d.text(((x0 + x1) / 2 - d.textlength(title, font=f_title) / 2, 14), title, fill="black", font=f_title)

    # curves, with the value at mark_alpha as a dot
    for i, (run, c) in enumerate(zip(data["runs"], curves)):
        color = COLORS[i % len(COLORS)]
        pts = [(px(a), py(v)) for a, v in zip(alphas, c)]
        d.line(pts, fill=color, width=3, joint="curve")
        if mark_alpha is not None and xmin <= mark_alpha <= xmax:
            vm = 100 * M.weighted_harmonic_mean(run["Ms"], run["Mt"], mark_alpha)
            cx, cy = px(mark_alpha), py(vm)
            d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=color)

    # legend under the plot: label, Ms, Mt, WHM at mark_alpha
    ly = y1 + 56
    lx = x0
    for i, run in enumerate(data["runs"]):
        color = COLORS[i % len(COLORS)]
        text = f"{run['label']}: Ms {100 * run['Ms']:.1f}, Mt {100 * run['Mt']:.1f}"
        if mark_alpha is not None:
            text += f", WHM({mark_alpha:g}) {100 * M.weighted_harmonic_mean(run['Ms'], run['Mt'], mark_alpha):.1f}"
        w = 30 + d.textlength(text, font=f_small) + 24
        if lx + w > x1 and lx > x0:
            lx, ly = x0, ly + 20
        d.line([(lx, ly + 8), (lx + 24, ly + 8)], fill=color, width=4)
        d.text((lx + 30, ly), text, fill="black", font=f_small)
        lx += w
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
    return img


def whm_csv(data: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["alpha"] + [r["label"] for r in data["runs"]])
    for j, a in enumerate(data["alphas"]):
        w.writerow([f"{a:g}"] + [repr(r["whm"][j]) for r in data["runs"]])
    return buf.getvalue()


def write_whm_plot(runs: dict, png_path, alphas=DEFAULT_ALPHAS, title=None) -> dict:
    """Draw the figure to `png_path` and write `<stem>.json` and `<stem>.csv` beside it.

    Returns {"png": path, "json": path, "csv": path, "data": the numbers}."""
    png_path = Path(png_path)
    if png_path.suffix.lower() != ".png":
        raise ValueError(f"--whm-plot {png_path}: the figure is written as PNG; give a path ending in .png")
    data = whm_sensitivity(runs, alphas)
    ks = sorted({tuple(r["ks"]) for r in data["runs"]})
    subtitle = f" (Ms, Mt = mean of R@{', R@'.join(map(str, ks[0]))})" if len(ks) == 1 and ks[0] else ""
    draw_whm_plot(data, png_path, title=title or f"WHM against alpha{subtitle}")
    json_path, csv_path = png_path.with_suffix(".json"), png_path.with_suffix(".csv")
    json_path.write_text(json.dumps({"formula": "WHM = (1 + alpha) * Ms * Mt / (alpha * Mt + Ms)", **data},
                                    indent=2) + "\n")
    csv_path.write_text(whm_csv(data))
    return {"png": png_path, "json": json_path, "csv": csv_path, "data": data}
