"""`make demo`: the toy workflow on the embedded ToyCanvas benchmark, one CLI run per step.

    python -m saemnesia.demo            # from the repository root; writes under runs/toy/

Each step is exactly the command a user would type (`python cli.py <subcommand> -c <config>`), run in this
process. A step whose output already exists is skipped, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cli import main as cli_main
from saemnesia.shards import MANIFEST_FILE, ShardManifest


@dataclass(frozen=True)
class Step:
    """One step of the workflow."""

    title: str
    """What the step does, as printed."""
    subcommand: str
    """LightningCLI subcommand: `fit`, `predict` or `test`."""
    config: str
    """Config file, relative to the repository root."""
    output: str
    """File whose existence means the step is done, relative to the working directory (`{hookpoint}` allowed)."""


STEPS = (
    Step("cache activations", "predict", "configs/toy/cache.yaml", f"runs/toy/activations/{MANIFEST_FILE}"),
    Step("unsupervised SAE", "fit", "configs/toy/sae.yaml", "runs/toy/sae/{hookpoint}/cfg.json"),
    Step("supervised SAE", "fit", "configs/toy/sae_supervised.yaml",
         "runs/toy/sae_supervised/{hookpoint}/concept_latents.json"),
)
REPO = Path(__file__).resolve().parents[1]


def run(steps: tuple[Step, ...] = STEPS) -> dict[str, dict[str, float]]:
    """Run the steps in order; returns the final logged metrics of each step that ran."""
    metrics: dict[str, dict[str, float]] = {}
    hookpoint = ""
    for number, step in enumerate(steps, start=1):
        output = Path(step.output.format(hookpoint=hookpoint))
        header = f"[{number}/{len(steps)}] {step.title}: python cli.py {step.subcommand} -c {step.config}"
        if output.exists():
            print(f"{header}  (done: {output} exists)")
        else:
            print(header, flush=True)
            started = time.perf_counter()
            cli = cli_main([step.subcommand, "-c", str(REPO / step.config)])
            metrics[step.title] = {name: float(value) for name, value in cli.trainer.callback_metrics.items()}
            print(f"    finished in {time.perf_counter() - started:.0f} s")
        if step.subcommand == "predict" and output.name == MANIFEST_FILE:
            hookpoint = ShardManifest.load(output).hookpoint
    return metrics


def main() -> None:
    metrics = run()
    supervised = metrics.get("supervised SAE", {})
    if supervised:
        print("\nsupervised SAE (validation):")
        for name in ("val/fvu", "val/object_hit_rate", "val/style_hit_rate", "val/l0"):
            if name in supervised:
                print(f"  {name:22s} {supervised[name]:.3f}")


if __name__ == "__main__":
    main()
