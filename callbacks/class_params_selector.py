"""`ClassParamsSelector`: each concept's erasing parameters, chosen from a sweep of evaluation runs (docs/method.md §5).

A sweep generates and evaluates the validation prompts once per candidate `{percentile, multiplier}` (7 runs for
SAEmnesia, 21 for SAeUron's grid), each evaluation writing `<sweep_dir>/<run>/results.json`. The candidate of a
run is the `params` entry of its results (`{"percentile": p, "multiplier": m}`, applied to every target), which the
evaluator reads from the erasure settings the generation run recorded next to its images (`generation.json`).

For each concept erased alone in some run, the selector keeps the candidate maximising `(UA_c + IRA_c) / 2`.
docs/method.md §5 leaves ties open. `ties="milder"` (the default) gives them to the smaller |multiplier|, then to the
larger percentile (fewer latents); `ties="stronger"` to the larger |multiplier|, then to the smaller percentile. Either
way the run name decides last, so the choice never depends on the order runs are listed in. With few validation images
per concept, ties are common (every multiplier past some strength erases all of them); which rule suits a setting
is discussed in docs/toycanvas.md, "Ties".

As a callback of the sweep's `test` runs it reselects after every evaluation, from all complete runs so far
(runs without `results.json` are skipped with a warning): the last run of the sweep leaves the final choice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from saemnesia.class_params import ConceptParams, save_class_params, validate_class_params
from saemnesia.evaluation import RESULTS_JSON

Ties = Literal["milder", "stronger"]


class Candidate(NamedTuple):
    """One concept's scores under one run's parameters."""

    run: str
    params: ConceptParams
    UA: float
    IRA: float

    @property
    def score(self) -> float:
        return (self.UA + self.IRA) / 2

    def rank(self, ties: Ties = "milder") -> tuple[float, float, float, str]:
        """Sort key, best first: highest score, then (`milder`) smallest |multiplier| and largest percentile, or
        (`stronger`) the reverse, then run name."""
        sign = 1 if ties == "milder" else -1
        # Rounded so that equal fractions summed in another order still tie.
        return (-round(self.score, 12), sign * abs(self.params["multiplier"]), -sign * self.params["percentile"],
                self.run)


def read_sweep(sweep_dir: str | Path) -> dict[str, list[Candidate]]:
    """Every concept erased alone in a complete run of `sweep_dir`, with its candidates."""
    sweep_dir = Path(sweep_dir)
    runs = sorted(path for path in sweep_dir.iterdir() if path.is_dir()) if sweep_dir.is_dir() else []
    incomplete = [run.name for run in runs if not (run / RESULTS_JSON).is_file()]
    if incomplete:
        rank_zero_warn(f"Sweep runs without {RESULTS_JSON} are skipped: {incomplete}.")
    candidates: dict[str, list[Candidate]] = {}
    for run in runs:
        if run.name in incomplete:
            continue
        path = run / RESULTS_JSON
        results = json.loads(path.read_text(encoding="utf-8"))
        params = results.get("params")
        if not isinstance(params, dict):
            raise ValueError(f"{path} has no 'params' (one percentile and multiplier for every target); evaluate "
                             "the images of a search run (model.erasure.percentile and multiplier set).")
        params = validate_class_params({"candidate": params}, source=f"{path} params")["candidate"]
        for kind in ("objects", "styles"):
            for target, scores in (results.get(kind) or {}).get("per_target", {}).items():
                concept = results["targets"][target]["erased"][0]
                candidates.setdefault(concept, []).append(Candidate(run.name, params, scores["UA"], scores["IRA"]))
    if not candidates:
        raise FileNotFoundError(f"No run folder of {sweep_dir} has a {RESULTS_JSON} with single-concept erasures.")
    return candidates


def select_class_params(sweep_dir: str | Path, ties: Ties = "milder") -> dict[str, ConceptParams]:
    """The best candidate of each concept (module docstring), in concept name order."""
    return {concept: min(options, key=lambda candidate: candidate.rank(ties)).params
            for concept, options in sorted(read_sweep(sweep_dir).items())}


class ClassParamsSelector(pl.Callback):
    """After a `test` run, writes the class_params chosen from all complete runs of a sweep."""

    def __init__(self, sweep_dir: str, outputs: list[str], ties: Ties = "milder"):
        """
        Args:
            sweep_dir: Folder of the sweep's run folders, each with the `results.json` of one evaluation.
            outputs: Files to write the choice to: `.json` and/or `.pth` (the published `torch.save` layout).
            ties: Which of equally scored candidates wins: the `milder` or the `stronger` intervention.
        """
        if not outputs:
            raise ValueError("ClassParamsSelector.outputs must name at least one .json or .pth file.")
        bad = [output for output in outputs if Path(output).suffix not in (".json", ".pth")]
        if bad:
            raise ValueError(f"ClassParamsSelector.outputs {bad} must end in .json or .pth.")
        if ties not in get_args(Ties):  # a Python caller's value (the CLI's Literal type refuses others)
            raise ValueError(f"ClassParamsSelector.ties must be one of {list(get_args(Ties))}, got {ties!r}.")
        self.sweep_dir, self.outputs, self.ties = Path(sweep_dir), [Path(output) for output in outputs], ties

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The evaluator has written this run's results at the end of the test epoch, before this hook.
        if trainer.is_global_zero:
            self.select()

    def select(self) -> dict[str, ConceptParams]:
        chosen = select_class_params(self.sweep_dir, self.ties)
        for output in self.outputs:
            save_class_params(output, chosen)
        rank_zero_info(f"class_params of {len(chosen)} concepts from {self.sweep_dir} → "
                       f"{', '.join(map(str, self.outputs))}")
        return chosen
