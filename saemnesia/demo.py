"""`make demo`: the whole workflow on ToyCanvas, one CLI run per step, then the comparison tables (objects, styles,
sequential unlearning), a plot of the sequential one and a sample grid.

    python -m saemnesia.demo            # from the repository root; writes under runs/toy/ and runs/demo/

Each step is exactly the command a user would type (`python cli.py <subcommand> -c <config> [overrides]`), run in
this process. A completed step is skipped and an interrupted fit resumes (`--ckpt_path=last`), so a rerun goes on.

Two erasers are compared, each with its own statistics, parameter search, unlearning run and evaluation for the
objects and again for the styles, and a sequential unlearning of the first 1, 2, 4 and 8 objects: the
supervised SAE (SAEmnesia: one latent per concept, 7 multipliers) and the unsupervised SAE it was fine-tuned from
(a SAeUron-style baseline: latents chosen by importance score, a documented subset of the percentile × multiplier
grid, `SAEURON_DEMO_GRID`). Both erase in `error_mode: exact`; the published error mode (`reference`,
docs/method.md §4) is measured in docs/toycanvas.md, with the command that reruns it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from callbacks.class_params_selector import Ties
from callbacks.sae_export import FIT_COMPLETE
from cli import main as cli_main
from saemnesia.class_params import SAEMNESIA_MULTIPLIERS, SAEMNESIA_PERCENTILE, ConceptParams, top_latents_percentile
from saemnesia.concepts import NO_ERASURE
from saemnesia.demo_report import report_table, sequential_table, style_table, write_sample_grid, write_sequential_plot
from saemnesia.evaluation import RESULTS_JSON
from saemnesia.io import atomic_write_text
from saemnesia.toy import TOY_OBJECTS, TOY_STYLES

REPO = Path(__file__).resolve().parents[1]
RUNS = Path("runs/toy")
REPORT_DIR = Path("runs/demo")
TOY_NUM_LATENTS = 1024
"""Latents of the toy SAEs (64 channels × expansion 16, configs/toy/sae.yaml)."""

TOP_LATENTS_PERCENTILES = {count: top_latents_percentile(TOY_NUM_LATENTS, count) for count in (3, 2, 1)}
"""SAeUron's percentiles select the top 3, 2 or 1 latents at L = 20480; these select as many of the toy SAE's."""
SAEURON_TOY_GRID: tuple[ConceptParams, ...] = tuple(
    {"percentile": percentile, "multiplier": m} for percentile in TOP_LATENTS_PERCENTILES.values()
    for m in SAEMNESIA_MULTIPLIERS)
"""SAeUron's search grid on the toy SAEs: 3 latent counts × 7 multipliers, 21 candidates."""
SAEURON_DEMO_GRID: tuple[ConceptParams, ...] = tuple(
    {"percentile": TOP_LATENTS_PERCENTILES[count], "multiplier": m} for count in (3, 1) for m in (-5.0, -15.0, -30.0))
"""The subset `make demo` searches to stay short: top-3 and top-1 latents with 3 multipliers spanning the range,
6 candidates. `main(DemoSetting(baseline_grid=SAEURON_TOY_GRID))` searches all 21."""


@dataclass(frozen=True)
class Step:
    """One CLI run of the workflow."""

    title: str
    """What the step does, as printed."""
    args: tuple[str, ...]
    """CLI arguments: subcommand, `-c config`, overrides."""
    output: Path
    """File written once the run completed, so its existence means the step is done (relative to the working dir)."""
    last_checkpoint: Path | None = None
    """A fit's `last.ckpt`: if it exists while the run has not completed, the run resumes from it."""


def cli_step(title: str, subcommand: str, config: str, output: Path, *overrides: str) -> Step:
    return Step(title, (subcommand, "-c", str(REPO / config), *overrides), output)


def fit_step(title: str, config: str, run_dir: Path, steps: int | None) -> Step:
    """A `fit` whose `SaeExport` and `ModelCheckpoint` write into `run_dir` (the toy configs' layout)."""
    max_steps = () if steps is None else (f"--trainer.max_steps={steps}",)
    return Step(title, ("fit", "-c", str(REPO / config), *max_steps), run_dir / FIT_COMPLETE,
                run_dir / "checkpoints/last.ckpt")


@dataclass(frozen=True)
class DemoSetting:
    """What the demo generates and trains, as overrides of the toy configs; `None` keeps the config's value."""

    objects: tuple[str, ...] | None = None
    """Objects prompted for, erased and evaluated (configs: all 8)."""
    styles: tuple[str, ...] | None = None
    """Styles of the cached and evaluated prompts (configs: all 8)."""
    sae_steps: int | None = None
    """Training steps of the unsupervised SAE."""
    supervised_steps: int | None = None
    """Training steps of the supervised fine-tuning."""
    saemnesia_multipliers: tuple[float, ...] = SAEMNESIA_MULTIPLIERS
    """SAEmnesia's search: one candidate per multiplier at percentile 99.999 (one latent)."""
    baseline_grid: tuple[ConceptParams, ...] = SAEURON_DEMO_GRID
    """The unsupervised baseline's search: its `{percentile, multiplier}` candidates."""
    search_ties: Ties = "stronger"
    """`ClassParamsSelector.ties` of both searches. Their validation sets are small, so many multipliers tie; how
    the milder choice compares is measured in docs/toycanvas.md, "Ties"."""

    @property
    def erased(self) -> tuple[str, ...]:
        return self.objects or TOY_OBJECTS

    @property
    def erased_styles(self) -> tuple[str, ...]:
        return self.styles or TOY_STYLES

    @property
    def sequential_steps(self) -> tuple[int, ...]:
        """How many of the erased objects (in order) each sequential target erases at once."""
        return tuple(n for n in (1, 2, 4, 8) if n <= len(self.erased))

    def data(self, styles: bool = True, objects: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """Overrides of a prompt data module: the objects (or `objects`), and the styles unless the config keeps
        its own."""
        chosen = {"objects": objects or self.objects, "styles": self.styles if styles else None}
        return tuple(f"--data.init_args.{key}=[{', '.join(names)}]" for key, names in chosen.items() if names)

    def search_data(self, part: Part) -> tuple[str, ...]:
        """Prompt overrides of a search: the objects plainly, or the first of them in every style
        (sweep_styles.yaml)."""
        if part == STYLES:
            return (*self.data(objects=self.erased[:1]), f"--data.init_args.targets=[{', '.join(self.erased_styles)}]")
        return (*self.data(styles=False), f"--data.init_args.targets=[{', '.join(self.erased)}]")

    def unlearning_data(self, part: Part, draws_unerased: bool) -> tuple[str, ...]:
        """Prompt overrides of an unlearning run: its targets, every prompt of the selected objects and styles."""
        if part == SEQUENTIAL:
            return (*self.data(), f"--data.init_args.sequential=[{', '.join(self.erased)}]",
                    f"--data.init_args.sequential_steps=[{', '.join(map(str, self.sequential_steps))}]")
        targets = self.erased_styles if part == STYLES else (*self.erased, *([NO_ERASURE] if draws_unerased else []))
        return (*self.data(), f"--data.init_args.targets=[{', '.join(targets)}]")


@dataclass(frozen=True)
class Part:
    """One part of the benchmark table: the suffix of its configs and folders, and of the statistics it erases with."""

    name: str
    """`""` (objects: the toy configs' own names), `_styles` or `_sequential`."""
    concepts: str
    """Suffix of the statistics, search and class_params it uses: `""` (objects) or `_styles`."""


OBJECTS, STYLES, SEQUENTIAL = Part("", ""), Part("_styles", "_styles"), Part("_sequential", "")
"""Object unlearning, style unlearning, and sequential unlearning of objects (with the objects' statistics)."""


@dataclass(frozen=True)
class Eraser:
    """One erasing SAE of the comparison and the folders of its runs."""

    label: str
    """Row name in the table."""
    sae: Path
    """The SAE folder (`SaeExport`'s output)."""
    name: str
    """Short name, printed with each step."""
    suffix: str
    """Suffix of this eraser's run folders under `runs/toy/`; empty for the toy configs' own folders."""
    grid: tuple[ConceptParams, ...]
    """Candidate `{percentile, multiplier}` of the search, all generated in one run."""
    draws_unerased: bool
    """Also generate the unerased images (target `none`); once is enough, with one eraser."""

    def folder(self, kind: str) -> Path:
        return RUNS / f"{kind}{self.suffix}"

    def stats(self, part: Part = OBJECTS) -> Path:
        return self.folder(f"stats{part.concepts}") / "concept_stats.safetensors"

    def class_params(self, part: Part = OBJECTS) -> Path:
        return RUNS / f"class_params{part.concepts}{self.suffix}.json"

    def images(self, part: Part = OBJECTS) -> Path:
        return self.folder(f"unlearn{part.name}") / "images"

    def results(self, part: Part = OBJECTS) -> Path:
        return self.folder(f"evaluate{part.name}") / RESULTS_JSON


def compared_erasers(setting: DemoSetting) -> tuple[Eraser, Eraser]:
    """The table's erasers, in order: the unsupervised baseline, then the supervised SAE."""
    saemnesia_grid = tuple({"percentile": SAEMNESIA_PERCENTILE, "multiplier": m} for m in setting.saemnesia_multipliers)
    return (Eraser("unsupervised SAE (SAeUron-style)", RUNS / "sae", "unsupervised", "_unsupervised",
                   setting.baseline_grid, False),
            Eraser("supervised SAE (SAEmnesia)", RUNS / "sae_supervised", "supervised", "", saemnesia_grid, True))


def erasure_overrides(eraser: Eraser, part: Part = OBJECTS, **settings: object) -> tuple[str, ...]:
    """`model.erasure` overrides: this eraser's SAE and the part's statistics, plus `settings` (`class_params`)."""
    settings = {"sae": eraser.sae, "stats": eraser.stats(part), **settings}
    return tuple(f"--model.init_args.erasure.{key}={value}" for key, value in settings.items())


def evaluation(title: str, images: Path, output_dir: Path, *overrides: str) -> Step:
    return cli_step(title, "test", "configs/toy/evaluate.yaml", output_dir / RESULTS_JSON,
                    f"--data.init_args.root={images}", f"--model.init_args.output_dir={output_dir}",
                    f"--trainer.default_root_dir={output_dir}", *overrides)


def search_steps(eraser: Eraser, setting: DemoSetting, part: Part) -> list[Step]:
    """Statistics of the part's concepts, and the parameter search (docs/method.md §5) with one SAE."""
    stats = eraser.stats(part)
    statistics = cli_step(f"{eraser.name}: concept statistics{part.name}", "predict",
                          f"configs/toy/stats{part.concepts}.yaml", stats, f"--trainer.callbacks.sae={eraser.sae}",
                          f"--trainer.callbacks.output={stats}", f"--trainer.default_root_dir={stats.parent}",
                          *setting.data(styles=part == STYLES))
    sweep = eraser.folder(f"sweep{part.concepts}")
    candidates = ", ".join(f"{{percentile: {c['percentile']}, multiplier: {c['multiplier']}}}" for c in eraser.grid)
    search = cli_step(f"{eraser.name}: search{part.name} of {len(eraser.grid)} candidates, generate", "predict",
                      f"configs/toy/sweep{part.concepts}.yaml", sweep / "images/manifest.jsonl",
                      *erasure_overrides(eraser, part), *setting.search_data(part),
                      f"--data.init_args.candidates=[{candidates}]",
                      f"--trainer.callbacks.output_dir={sweep / 'images'}", f"--trainer.default_root_dir={sweep}")
    # Done once the selection is written: it comes after the evaluation's results.json.
    select = cli_step(f"{eraser.name}: search{part.name}, evaluate and select", "test",
                      "configs/toy/sweep_evaluate.yaml", eraser.class_params(part),
                      f"--data.init_args.root={sweep / 'images'}", f"--model.init_args.output_dir={sweep}",
                      f"--trainer.default_root_dir={sweep}",
                      f"--trainer.callbacks.outputs=[{eraser.class_params(part)}]",
                      f"--trainer.callbacks.ties={setting.search_ties}")
    return [statistics, search, select]


def unlearning_steps(eraser: Eraser, setting: DemoSetting, part: Part = OBJECTS) -> list[Step]:
    """Unlearning generation of the part's targets with the searched `class_params`, and its evaluation."""
    images = eraser.images(part)
    unlearn = cli_step(f"{eraser.name}: unlearning{part.name}, generate", "predict",
                       f"configs/toy/unlearn{part.name}.yaml", images / "manifest.jsonl",
                       *erasure_overrides(eraser, part, class_params=eraser.class_params(part)),
                       *setting.unlearning_data(part, eraser.draws_unerased and part == OBJECTS),
                       f"--trainer.callbacks.output_dir={images}", f"--trainer.default_root_dir={images.parent}")
    results = eraser.results(part)
    evaluate = evaluation(f"{eraser.name}: unlearning{part.name}, evaluate", images, results.parent,
                          f"--trainer.logger.init_args.name={results.parent.name}")
    return [unlearn, evaluate]


def eraser_steps(eraser: Eraser, setting: DemoSetting) -> list[Step]:
    """Objects, then styles (each: statistics, search, unlearning, evaluation), then sequential unlearning."""
    return [*search_steps(eraser, setting, OBJECTS), *unlearning_steps(eraser, setting, OBJECTS),
            *search_steps(eraser, setting, STYLES), *unlearning_steps(eraser, setting, STYLES),
            *unlearning_steps(eraser, setting, SEQUENTIAL)]


def workflow(setting: DemoSetting) -> list[Step]:
    """Every step of the demo, in order."""
    baseline, supervised = compared_erasers(setting)
    return [
        cli_step("cache activations", "predict", "configs/toy/cache.yaml", RUNS / "activations/manifest.json",
                 *setting.data()),
        fit_step("unsupervised SAE", "configs/toy/sae.yaml", RUNS / "sae", setting.sae_steps),
        fit_step("supervised SAE", "configs/toy/sae_supervised.yaml", RUNS / "sae_supervised",
                 setting.supervised_steps),
        *eraser_steps(baseline, setting),
        *eraser_steps(supervised, setting),
    ]


def run(steps: list[Step]) -> None:
    """Run each step not yet done, printing its exact command first; an interrupted fit resumes."""
    for number, step in enumerate(steps, start=1):
        done = step.output.exists()
        resumes = not done and step.last_checkpoint is not None and step.last_checkpoint.exists()
        args = (*step.args, "--ckpt_path=last") if resumes else step.args
        print(f"[{number}/{len(steps)}] {step.title}: python cli.py {' '.join(args)}", flush=True)
        if done:
            print(f"    done: {step.output} exists", flush=True)
            continue
        started = time.perf_counter()
        cli_main(list(args))
        print(f"    finished in {time.perf_counter() - started:.0f} s", flush=True)


def main(setting: DemoSetting = DemoSetting()) -> str:
    """Run (or resume) the workflow, then write `runs/demo/report.md` with its three tables, `sequential.png` and
    `samples.png`; returns the tables."""
    started = time.perf_counter()
    run(workflow(setting))
    compared = compared_erasers(setting)
    results, styles, sequential = ({eraser.label: json.loads(eraser.results(part).read_text()) for eraser in compared}
                                   for part in (OBJECTS, STYLES, SEQUENTIAL))
    tables = (f"## Objects\n\n{report_table(results, {e.label: len(e.grid) for e in compared})}\n"
              f"## Styles\n\n{style_table(styles)}\n## Sequential unlearning of objects\n\n"
              f"{sequential_table(sequential)}")
    write_sequential_plot(REPORT_DIR / "sequential.png", sequential)
    unerased = next(eraser.images() for eraser in compared if eraser.draws_unerased)
    write_sample_grid(REPORT_DIR / "samples.png", unerased, {eraser.label: eraser.images() for eraser in compared})
    columns = " | ".join(["no erasure", *(eraser.label for eraser in compared)])
    atomic_write_text(REPORT_DIR / "report.md", f"# ToyCanvas demo\n\n{tables}\n"
                      "![UA, IRA and CRA against the number of objects erased](sequential.png)\n\n"
                      f"![One row per object: {columns}](samples.png)\n")
    print(f"\n{tables}\nWritten to {REPORT_DIR / 'report.md'}, {REPORT_DIR / 'sequential.png'} and "
          f"{REPORT_DIR / 'samples.png'} (columns: {columns}) in {time.perf_counter() - started:.0f} s; "
          f"TensorBoard: tensorboard --logdir {RUNS / 'logs'}", flush=True)
    return tables


if __name__ == "__main__":
    main()
