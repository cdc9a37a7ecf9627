"""Figures a person opens: loss curves and sample grids (matplotlib, Agg, written atomically).

Every figure carries the weights' label, so a grid made with random-init weights says so.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fashion_sd.files import atomic_path  # noqa: E402


def _save(fig, path: str | Path, footer: str) -> Path:
    # Below the figure: bbox_inches="tight" grows the canvas to include it.
    alarming = "RANDOM" in footer or "NOT COMPARABLE" in footer
    fig.text(0.5, -0.01, textwrap.fill(footer, 70), ha="center", va="top", fontsize=8,
             color="red" if alarming else "dimgray")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def loss_curves(history, path: str | Path, label: str, title: str = "LoRA fine-tuning") -> Path:
    """Train and validation loss against epoch (fractional for a run stopped mid-epoch)."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(history["epoch"], history["loss"], "o-", label="train loss")
    if "val_loss" in history and np.isfinite(np.asarray(history["val_loss"], float)).any():
        ax.plot(history["epoch"], history["val_loss"], "s-", label="val loss (fixed noise)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (epsilon)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path, label)


def sample_grid(rows: list[tuple[str, np.ndarray]], path: str | Path, label: str,
                title: str = "", col_titles: list[str] | None = None) -> Path:
    """One row per prompt (title, images (n, H, W, 3) uint8), one column per seed."""
    n_cols = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.4 * n_cols, 2.9 * len(rows)),
                             squeeze=False)
    for r, (prompt, images) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c])
            if col_titles and c < len(col_titles):
                ax.text(0.02, 0.02, col_titles[c], transform=ax.transAxes, fontsize=7,
                        color="white", va="bottom",
                        bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0})
        axes[r][0].set_title(textwrap.fill(prompt, 34 * n_cols), fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, label)


RATES = {"type_top1": "type top-1", "type_top3": "type top-3", "colour_top1": "colour top-1 (CLIP)",
         "gender_top1": "gender top-1 (CLIP)", "on_model_rate": "on model",
         "colour_accuracy": "colour right", "cut_off_rate": "cut off"}


def metric_curves(table, path: str | Path, label: str) -> Path:
    """FID and KID against epoch for the checkpoints (the base model as a dashed line), CMMD and
    FD-DINOv2 where measured (error bars: bootstrap standard errors), then the CLIP score and the
    garment rates where they were measured."""
    base = table[table.checkpoint == "base"]
    runs = table[~table.checkpoint.isin(["base", "real"])].sort_values("epoch")
    x = runs.epoch.where(runs.epoch.notna(), other=np.arange(len(runs)))
    panels = [("fid", "FID (lower is better)"), ("kid_mean", "KID (lower is better)")]
    panels += [(c, f"{name} (lower is better)") for c, name in
               (("cmmd", "CMMD"), ("fd_dinov2", "FD-DINOv2")) if c in table and
               pd.to_numeric(table[c], errors="coerce").notna().any()]
    if "clip_score" in table and table.clip_score.notna().any():
        panels.append(("clip_score", "CLIP score (higher is better)"))
    rates = [c for c in RATES if c in table and table[c].notna().any()]
    fig, axes = plt.subplots(1, len(panels) + bool(rates), figsize=(4.2 * (len(panels) + bool(rates)), 3.8))
    for ax, (col, name) in zip(axes, panels):
        spread = "kid_std" if col == "kid_mean" else f"{col}_se"
        err = runs[spread].astype(float) if spread in runs else None
        if len(runs):
            ax.errorbar(x, runs[col].astype(float), yerr=err, fmt="o-", capsize=3,
                        label="LoRA checkpoints")
        if len(base):
            ax.axhline(float(base[col].iloc[0]), ls="--", color="gray", label="base model")
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if rates:
        ax = axes[-1]
        for col in rates:
            line, = ax.plot(x, runs[col].astype(float), "o-", label=RATES[col])
            if len(base) and pd.notna(base[col].iloc[0]):
                ax.axhline(float(base[col].iloc[0]), ls="--", color=line.get_color(), alpha=0.5)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("epoch")
        ax.set_title("garment rates (dashed: base model)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Scores per checkpoint against held-out images and prompts")
    fig.tight_layout()
    return _save(fig, path, label)


def sweep_figures(results, out: str | Path, label: str) -> list[Path]:
    """The paper's Figs 7-9 as pictures: best FID (and KID) by rank, learning rate, batch size.

    Each line joins runs that share the other two settings, so a line shows one factor's effect.
    """
    made = []
    done = results[results.best_fid.notna()] if "best_fid" in results else results.iloc[:0]
    for param, title, log in (("rank", "LoRA rank", False), ("learning_rate", "learning rate", True),
                              ("batch_size", "batch size", False)):
        others = [p for p in ("rank", "learning_rate", "batch_size") if p != param]
        groups = [(key, g) for key, g in done.groupby(others) if g[param].nunique() > 1]
        if not groups:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for key, g in groups:
            g = g.sort_values(param)
            tag = ", ".join(f"{o}={v:g}" for o, v in zip(others, key))
            axes[0].plot(g[param], g.best_fid, "o-", label=tag)
            axes[1].plot(g[param], g.best_kid, "o-", label=tag)
        for ax, name in zip(axes, ("best FID", "best KID")):
            ax.set_xlabel(title)
            ax.set_ylabel(name)
            if log:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"best FID and KID by {title} (lower is better)")
        fig.tight_layout()
        made.append(_save(fig, Path(out) / f"fid_by_{param}.png", label))
    return made


def all_loss_curves(histories: dict, path: str | Path, label: str) -> Path:
    """Every run's train (solid) and val (dashed) loss in one figure, the paper's Fig 12."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, h) in enumerate(sorted(histories.items())):
        colour = f"C{i % 10}"
        ax.plot(h.epoch, h.loss, "-", color=colour, label=f"{name} train")
        if h.val_loss.notna().any():
            ax.plot(h.epoch, h.val_loss, "--", color=colour, label=f"{name} val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (epsilon)")
    ax.set_title("loss curves of every run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path, label)
