"""The training curves: loss and top-1 per epoch, train beside validation, as one PNG."""

from __future__ import annotations

from fasteval.files import atomic_write


def plot_curves(history: list[dict], path: str, best: int | None = None) -> None:
    """Two panels (per-sample mean loss; top-1 %), the ``best`` epoch marked, written to a temporary file
    and renamed over ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        loss_ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
        loss_ax.plot(epochs, [r["val_loss"] for r in history], "s-", label="validation")
        loss_ax.set(xlabel="epoch", ylabel="cross-entropy (per-sample mean)", title="loss")
        acc_ax.plot(epochs, [r["train_top1"] for r in history], "o-", label="train")
        acc_ax.plot(epochs, [r["val_top1"] for r in history], "s-", label="validation top-1")
        acc_ax.plot(epochs, [r["val_top5"] for r in history], "^--", label="validation top-5")
        acc_ax.set(xlabel="epoch", ylabel="%", title="accuracy")
        for ax in (loss_ax, acc_ax):
            if best is not None:
                ax.axvline(best, color="gray", linestyle=":", label=f"best (epoch {best})")
            ax.legend()
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        fig.tight_layout()
        with atomic_write(path, binary=True) as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
