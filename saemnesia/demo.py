"""`make demo`: the whole workflow on the toy configs, one CLI run per step, then the results table.

    python -m saemnesia.demo            # from the repository root; writes under runs/toy/

Each step is exactly the command a user would type (`python cli.py <subcommand> -c <config> [overrides]`), run in
this process. A step whose output already exists is skipped, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from cli import main as cli_main
from saemnesia.class_params import SAEMNESIA_MULTIPLIERS
from saemnesia.evaluation import RESULTS_JSON
from saemnesia.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RUNS = Path("runs/toy")
CLASS_PARAMS = RUNS / "class_params.json"
REPORT = Path("runs/demo/report.md")


@dataclass(frozen=True)
class Step:
    """One CLI run of the workflow."""

    title: str
    """What the step does, as printed."""
    args: tuple[str, ...]
    """CLI arguments: subcommand, `-c config`, overrides."""
    output: Path
    """File whose existence means the step is done (relative to the working directory)."""


def cli_step(title: str, subcommand: str, config: str, output: Path, *overrides: str) -> Step:
    return Step(title, (subcommand, "-c", str(REPO / config), *overrides), output)


def multiplier_search() -> list[Step]:
    """SPEC §5: one generation + evaluation per multiplier; the selector keeps each concept's best."""
    steps = []
    for multiplier in SAEMNESIA_MULTIPLIERS:
        run = RUNS / f"sweep/m{multiplier:g}"
        steps.append(cli_step(f"search m={multiplier:g}: generate", "predict", "configs/toy/sweep.yaml",
                              run / "manifest.jsonl", f"--model.init_args.erasure.multiplier={multiplier}",
                              f"--trainer.callbacks.output_dir={run}", f"--trainer.default_root_dir={run}"))
        steps.append(cli_step(f"search m={multiplier:g}: evaluate", "test", "configs/toy/evaluate.yaml",
                              run / RESULTS_JSON, f"--data.init_args.root={run}", f"--model.init_args.output_dir={run}",
                              "--trainer.logger=false", "--trainer.callbacks+=callbacks.ClassParamsSelector",
                              f"--trainer.callbacks.sweep_dir={RUNS / 'sweep'}",
                              f"--trainer.callbacks.outputs=[{CLASS_PARAMS}]"))
    return steps


STEPS = [
    cli_step("cache activations", "predict", "configs/toy/cache.yaml", RUNS / "activations/manifest.json"),
    cli_step("unsupervised SAE", "fit", "configs/toy/sae.yaml", RUNS / "sae/checkpoints/last.ckpt"),
    cli_step("supervised SAE", "fit", "configs/toy/sae_supervised.yaml", RUNS / "sae_supervised/checkpoints/last.ckpt"),
    cli_step("concept statistics", "predict", "configs/toy/stats.yaml", RUNS / "stats/concept_stats.safetensors"),
    *multiplier_search(),
    cli_step("unlearning generation", "predict", "configs/toy/unlearn.yaml", RUNS / "unlearn/images/manifest.jsonl"),
    cli_step("evaluation", "test", "configs/toy/evaluate.yaml", RUNS / "evaluate" / RESULTS_JSON),
]


def run(steps: list[Step]) -> None:
    for number, step in enumerate(steps, start=1):
        header = f"[{number}/{len(steps)}] {step.title}: python cli.py {' '.join(step.args)}"
        if step.output.exists():
            print(f"{header}\n    done: {step.output} exists", flush=True)
            continue
        print(header, flush=True)
        started = time.perf_counter()
        cli_main(list(step.args))
        print(f"    finished in {time.perf_counter() - started:.0f} s", flush=True)


def report(results: dict) -> str:
    """The demo's table: the unerased model's accuracies and the supervised SAE's erasure scores, in %."""
    objects, reference = results["objects"], results.get("reference") or {}
    searched = sum(1 for _ in (RUNS / "sweep").glob(f"m*/{RESULTS_JSON}"))
    rows = [
        "| model | UA | IRA | CRA | generation runs of the search |",
        "|---|---|---|---|---|",
        f"| no erasure (object / style accuracy) | – | {100 * reference.get('object_accuracy', float('nan')):.1f} "
        f"| {100 * reference.get('style_accuracy', float('nan')):.1f} | – |",
        f"| supervised SAE (SAEmnesia) | {100 * objects['UA']:.1f} | {100 * objects['IRA']:.1f} "
        f"| {100 * objects['CRA']:.1f} | {searched} |",
    ]
    return "\n".join(rows) + "\n"


def main() -> None:
    run(STEPS)
    results = json.loads((RUNS / "evaluate" / RESULTS_JSON).read_text())
    table = report(results)
    atomic_write_text(REPORT, f"# ToyCanvas demo\n\n{table}")
    print(f"\n{table}\nWritten to {REPORT}; TensorBoard: tensorboard --logdir {RUNS / 'logs'}")


if __name__ == "__main__":
    main()
