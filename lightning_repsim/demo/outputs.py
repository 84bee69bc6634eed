"""Where the demo's results go: ``summary.json``, the CSV logger's per-epoch metrics and an offline wandb run, which
is finished *and written to disk* before the demo returns."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["close_wandb_run", "make_loggers", "write_summary"]


def make_loggers(out: Path, run_name: str, config: Mapping[str, Any], use_wandb: bool) -> tuple[list[Any], Any | None]:
    """``([CSVLogger, WandbLogger], wandb_logger)`` writing under ``out`` (``csv/`` and ``wandb/``); the wandb run is
    offline and records ``config``. Without ``use_wandb``: ``([CSVLogger], None)``."""
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(out), name="csv")]
    if not use_wandb:
        return loggers, None
    from lightning.pytorch.loggers import WandbLogger

    wandb_logger = WandbLogger(project="lightning_repsim-demo", name=run_name, save_dir=str(out), offline=True)
    wandb_logger.log_hyperparams(dict(config))
    loggers.append(wandb_logger)
    return loggers, wandb_logger


def write_summary(summary: Mapping[str, Any], out: Path) -> Path:
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def close_wandb_run(wandb_logger: Any, summary: Mapping[str, Any], png: Path) -> Path:
    """Log the picture and the final numbers (run summary ``final/<student>/<key>``) to the demo's wandb run, finish
    it and wait until its files are complete; returns the run's folder (``.../wandb/offline-run-*``).

    ``run.finish()`` only *asks* wandb's service process to close the run (wandb 0.31: a message it does not wait
    on), and the service writes the last, partial 32 KiB block of the run's transaction log (``run-*.wandb``) when
    it closes it: right after ``finish()`` returns, the file can still lack the last epochs' values. When no other
    wandb run is active in this process, ``wandb.teardown()`` waits for the service to close every run and exit (a
    later ``wandb.init`` starts a new one); otherwise the file is completed when that run's session ends.
    """
    import wandb

    run = wandb_logger.experiment
    wandb_logger.log_image(key="demo/embeddings", images=[str(png)],
                           caption=["teacher, KL student, logit student (coloured by class)"])
    run.summary.update({f"final/{name}/{key}": value for name, values in summary["students"].items()
                        for key, value in values.items()})
    run_dir = Path(run.dir).parent
    run.finish()
    if wandb.run is None:
        wandb.teardown()
    return run_dir
