"""`ClassParamsSelector`: each concept's erasing parameters, chosen from the evaluation of a search (docs/method.md §5).

A search generates the validation prompts once per candidate `{percentile, multiplier}` (7 for SAEmnesia, SAeUron's
grid of percentiles × multipliers) in one `predict` run (`data.candidates`), and one `test` run evaluates them all:
its `results.json` holds one report per candidate under `candidates`.

For each concept erased alone, the selector keeps the candidate maximising `(UA_c + IRA_c) / 2` (`objective:
published`), or `(UA_c + IRA_c + TR_c) / 3` (`objective: with_retention`), which also weighs what the eraser kept of
the concept's own images (target retention, saemnesia/metrics.py). docs/method.md §5 leaves ties open.
`ties="milder"` (the default) gives them to the smaller |multiplier|, then to the larger percentile (fewer latents);
`ties="stronger"` to the larger |multiplier|, then to the smaller percentile. With few validation
images per concept, ties are common (every multiplier past some strength erases all of them); which rule suits a
setting is discussed in docs/toycanvas.md, "Ties".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from saemnesia.class_params import Candidate, ConceptParams, save_class_params
from saemnesia.evaluation import RESULTS_JSON, UnlearningEvaluator

Ties = Literal["milder", "stronger"]
Objective = Literal["published", "with_retention"]


class ScoredCandidate(NamedTuple):
    """One concept's scores under one candidate."""

    candidate: Candidate
    UA: float
    IRA: float
    TR: float | None = None
    """Target retention; `None` in evaluations without it (older ones, or no styled images of the concept)."""

    def score(self, objective: Objective = "published") -> float:
        if objective == "published":
            return (self.UA + self.IRA) / 2
        if self.TR is None:
            raise ValueError(f"objective {objective!r} needs each candidate's TR, which the evaluation of "
                             f"{self.candidate.name} lacks; evaluate the search again with styled prompts.")
        return (self.UA + self.IRA + self.TR) / 3

    def rank(self, ties: Ties = "milder", objective: Objective = "published") -> tuple[float, float, float]:
        """Sort key, best first: highest score, then (`milder`) smallest |multiplier| and largest percentile, or
        (`stronger`) the reverse."""
        sign = 1 if ties == "milder" else -1
        # Rounded so that equal fractions summed in another order still tie.
        return (-round(self.score(objective), 12), sign * abs(self.candidate.multiplier),
                -sign * self.candidate.percentile)


def read_search(results_json: str | Path) -> dict[str, list[ScoredCandidate]]:
    """Every concept erased alone in a search's evaluation, with its scores under each candidate."""
    path = Path(results_json)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; evaluate the search's images first (configs/*/evaluate.yaml).")
    results = json.loads(path.read_text(encoding="utf-8"))
    if not results.get("candidates"):
        raise ValueError(f"{path} has no 'candidates'; evaluate the images of a search run (data.candidates set).")
    scored: dict[str, list[ScoredCandidate]] = {}
    for index, section in enumerate(results["candidates"]):
        candidate = Candidate.from_params(section["params"], f"{path} candidates[{index}] params")
        for kind in ("objects", "styles"):
            for target, scores in (section[kind] or {}).get("per_target", {}).items():
                concept = results["targets"][target]["erased"][0]
                scored.setdefault(concept, []).append(
                    ScoredCandidate(candidate, scores["UA"], scores["IRA"], scores.get("TR")))
    if not scored:
        raise ValueError(f"{path} rates no single-concept erasure; search targets that erase one concept each.")
    return scored


def select_class_params(results_json: str | Path, ties: Ties = "milder",
                        objective: Objective = "published") -> dict[str, ConceptParams]:
    """The best candidate of each concept (module docstring), in concept name order."""
    return {concept: min(options, key=lambda option: option.rank(ties, objective)).candidate._asdict()
            for concept, options in sorted(read_search(results_json).items())}


class ClassParamsSelector(pl.Callback):
    """After the `test` run that evaluates a search, writes the class_params chosen from its `results.json`."""

    def __init__(self, outputs: list[str], ties: Ties = "milder", objective: Objective = "published"):
        """
        Args:
            outputs: Files to write the choice to: `.json` and/or `.pth` (the published `torch.save` layout).
            ties: Which of equally scored candidates wins: the `milder` or the `stronger` intervention.
            objective: `published` ranks by (UA + IRA) / 2; `with_retention` by (UA + IRA + TR) / 3.
        """
        if not outputs:
            raise ValueError("ClassParamsSelector.outputs must name at least one .json or .pth file.")
        bad = [output for output in outputs if Path(output).suffix not in (".json", ".pth")]
        if bad:
            raise ValueError(f"ClassParamsSelector.outputs {bad} must end in .json or .pth.")
        if ties not in get_args(Ties):  # a Python caller's value (the CLI's Literal type refuses others)
            raise ValueError(f"ClassParamsSelector.ties must be one of {list(get_args(Ties))}, got {ties!r}.")
        if objective not in get_args(Objective):
            raise ValueError(f"ClassParamsSelector.objective must be one of {list(get_args(Objective))}, got "
                             f"{objective!r}.")
        self.outputs, self.ties, self.objective = [Path(output) for output in outputs], ties, objective

    def on_test_end(self, trainer: pl.Trainer, pl_module: UnlearningEvaluator) -> None:
        # The evaluator has written this run's results at the end of the test epoch, before this hook.
        if trainer.is_global_zero:
            self.select(pl_module.output_dir / RESULTS_JSON)

    def select(self, results_json: str | Path) -> dict[str, ConceptParams]:
        chosen = select_class_params(results_json, self.ties, self.objective)
        for output in self.outputs:
            save_class_params(output, chosen)
        rank_zero_info(f"class_params of {len(chosen)} concepts from {results_json} → "
                       f"{', '.join(map(str, self.outputs))}")
        return chosen
