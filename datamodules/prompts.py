"""`PromptDataModule`: the prompt items of a `predict` run (docs/method.md §5, §6, §8), in a fixed order.

Prompts come from a template (`"An image of {object}"`) or from anchor-prompt files (UnlearnCanvas layout: one
prompt per line in `sd_prompt_{Object}.txt`), each rendered with every selected style and plainly:
`"{subject} in {Style with spaces} style."` and `"{subject}."`, as docs/method.md §6 and the reference caching do.
The multiplier search's validation set pairs anchor prompt i with style i instead (`pairing="anchor_i_style_i"`).

Unlearning runs repeat the prompts once per erasure target (`targets`, `sequential`): each copy carries the concepts
to erase and the target's label, and keeps the prompt id, so a prompt starts from the same noise under every target.
A parameter search (docs/method.md §5) repeats them once more per candidate `{percentile, multiplier}` (`candidates`),
so that one run generates every candidate's images. Items are ordered candidate by candidate and target by target,
so that most batches share one eraser.

Under DDP Lightning's predict sampler deals items round-robin without padding (`UnrepeatedDistributedSampler`),
so no item is generated twice. `exclude` drops items that an earlier, interrupted run already stored.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Collection
from operator import attrgetter
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from saemnesia.class_params import Candidate
from saemnesia.classifiers import UNLEARNCANVAS_STYLE_LABELS
from saemnesia.concepts import NO_ERASURE, UNLEARNCANVAS, ConceptVocabulary, styled_prompt
from saemnesia.generation import PromptItem
from saemnesia.toy.vocabulary import TOY_VOCABULARY

VOCABULARIES = {"toy": TOY_VOCABULARY, "unlearncanvas": UNLEARNCANVAS,
                "unlearncanvas_seed_images": ConceptVocabulary(UNLEARNCANVAS.objects, UNLEARNCANVAS_STYLE_LABELS)}
"""Vocabularies a config may name instead of listing them: ToyCanvas; UnlearnCanvas (20 objects, 50 styles); and the
same with the style classifier's `Seed_Images` as a 51st style in head order, as the reference caching prompted."""

PLAIN = "plain"
"""Stands for the missing style in prompt ids."""


def prompt_id(obj: str, style: str | None, subject_index: int, seed: int) -> str:
    """A stable id such as `Bears-Cubism-007-s188` (plain: `Bears-plain-007-s188`)."""
    return f"{obj}-{style or PLAIN}-{subject_index:03d}-s{seed}"


def read_anchor_prompts(folder: str | Path, objects: Collection[str]) -> dict[str, list[str]]:
    """The non-empty lines of `sd_prompt_{Object}.txt` per object, without a trailing period."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data.anchor_prompts folder {folder} does not exist; expected a folder of "
                                "sd_prompt_{Object}.txt files.")
    missing = [obj for obj in objects if not (folder / f"sd_prompt_{obj}.txt").is_file()]
    if missing:
        raise FileNotFoundError(f"data.anchor_prompts folder {folder} has no prompt file for classes {missing}; "
                                "expected sd_prompt_{Object}.txt for each.")
    lines = {obj: (folder / f"sd_prompt_{obj}.txt").read_text(encoding="utf-8").splitlines() for obj in objects}
    return {obj: [line.strip().removesuffix(".") for line in text if line.strip()] for obj, text in lines.items()}


class PromptDataModule(pl.LightningDataModule):
    """Prompt items: every erasure target × selected object × subject (template or anchor prompt) × style (and
    plain) × seed."""

    def __init__(self, vocabulary: ConceptVocabulary | str = "unlearncanvas", objects: list[str] | None = None,
                 styles: list[str] | None = None, include_plain: bool = True, anchor_prompts: str | None = None,
                 prompts_per_object: int | None = None, template: str = "An image of {object}",
                 seeds: tuple[int, ...] = (188,), shuffle: bool = False, shuffle_seed: int = 0,
                 limit: int | None = None, pairing: Literal["all", "anchor_i_style_i"] = "all",
                 targets: list[str] | None = None, sequential: list[str] | None = None,
                 sequential_steps: list[int] | None = None, candidates: list[dict[str, float]] | None = None,
                 batch_size: int = 4, num_workers: int = 0):
        """
        Args:
            vocabulary: Concept names: explicit `{objects, styles}`, or a name of `VOCABULARIES` (`toy`,
                `unlearncanvas`, `unlearncanvas_seed_images`).
            objects: Subset of the vocabulary's objects to prompt for; `None` = all.
            styles: Subset of the vocabulary's styles; `None` = all, `[]` = none (plain prompts only).
            include_plain: Also prompt every subject without a style.
            anchor_prompts: Folder of UnlearnCanvas anchor prompts (`sd_prompt_{Object}.txt`, one per line);
                `None` = one subject per object from `template`.
            prompts_per_object: Use the first n anchor prompts of each object (anchor mode only); `None` = all.
            template: Subject of template-mode prompts; `{object}` is replaced by the object name.
            seeds: Seeds per prompt: each gives its own item (and image). Published: 188.
            shuffle: Shuffle the prompts once, with `shuffle_seed`, so shards mix concepts (the order stays fixed;
                with several targets every target gets the same order).
            shuffle_seed: Seed of that shuffle.
            limit: Keep only the first n items (after the shuffle: a random subset); `None` = all.
            pairing: `all` renders every subject with every style; `anchor_i_style_i` renders subject i of each
                object with style i only (the multiplier search's validation set, docs/method.md §5), plus plain if
                asked.
            targets: Erasure targets, each repeating every prompt with that concept erased (docs/method.md §6: every
                object, or every style for style unlearning); `none` repeats them without erasure (the baseline).
                `None` (and no `sequential`): one copy without erasure, as caching and statistics want.
            sequential: Order of sequential unlearning; target `first_{n:02d}` erases its first n concepts at once.
            sequential_steps: The n values of `sequential`, e.g. `[1, 2, 4, 8]`.
            candidates: The `{percentile, multiplier}` candidates of a parameter search, each repeating every erasing
                item with that candidate's parameters for all its concepts; `None`: erase with `class_params`.
            batch_size: Prompt items per batch and process.
            num_workers: DataLoader worker processes.

        The vocabulary of the run (`self.vocabulary`) is the selected objects and styles.
        """
        super().__init__()
        if isinstance(vocabulary, str):
            if vocabulary not in VOCABULARIES:
                raise ValueError(f"data.vocabulary {vocabulary!r} is not a known vocabulary; expected "
                                 f"{{objects, styles}} or one of {list(VOCABULARIES)}.")
            vocabulary = VOCABULARIES[vocabulary]
        for option, chosen, known in (("objects", objects, vocabulary.objects), ("styles", styles, vocabulary.styles)):
            unknown = [name for name in chosen or [] if name not in known]
            if unknown:
                raise ValueError(f"data.{option} {unknown} are not in the vocabulary; expected some of {list(known)}.")
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"data.seeds must be a non-empty list of distinct seeds, got {list(seeds)}.")
        for name, value in (("prompts_per_object", prompts_per_object), ("limit", limit), ("batch_size", batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value}.")
        if prompts_per_object is not None and anchor_prompts is None:
            raise ValueError("data.prompts_per_object selects anchor prompts; it needs data.anchor_prompts.")
        if pairing not in ("all", "anchor_i_style_i"):
            raise ValueError(f"data.pairing must be 'all' or 'anchor_i_style_i', got {pairing!r}.")
        erasures = erasure_targets(vocabulary, targets, sequential, sequential_steps)
        searched = search_candidates(candidates, erasures)
        self.vocabulary = ConceptVocabulary(
            objects=tuple(name for name in vocabulary.objects if objects is None or name in objects),
            styles=tuple(name for name in vocabulary.styles if styles is None or name in styles))
        self.batch_size, self.num_workers = batch_size, num_workers
        subjects = self._subjects(anchor_prompts, prompts_per_object, template)
        prompts = self._items(subjects, include_plain, seeds, pairing)
        if shuffle:
            random.Random(shuffle_seed).shuffle(prompts)
        self.items = [item._replace(erase=erase, target=target, candidate=candidate) for candidate in searched
                      for target, erase in erasures.items() for item in prompts][:limit]
        if not self.items:
            raise ValueError("The prompt selection is empty; select at least one object and a style or plain prompts.")
        self.excluded: frozenset[str] = frozenset()
        self.exclusion_key: Callable[[PromptItem], str] = attrgetter("prompt_id")

    def _subjects(self, anchor_prompts: str | None, prompts_per_object: int | None,
                  template: str) -> dict[str, list[str]]:
        """Prompt subjects per object: its anchor prompts, or the template filled in."""
        if anchor_prompts is None:
            return {obj: [template.format(object=obj)] for obj in self.vocabulary.objects}
        subjects = read_anchor_prompts(anchor_prompts, self.vocabulary.objects)
        if prompts_per_object is not None:
            short = {obj: len(lines) for obj, lines in subjects.items() if len(lines) < prompts_per_object}
            if short:
                raise ValueError(f"data.prompts_per_object={prompts_per_object} exceeds the anchor prompts of "
                                 f"{short} (prompts per class) in {anchor_prompts}.")
            subjects = {obj: lines[:prompts_per_object] for obj, lines in subjects.items()}
        return subjects

    def _items(self, subjects: dict[str, list[str]], include_plain: bool, seeds: tuple[int, ...],
               pairing: str) -> list[PromptItem]:
        plain: list[str | None] = [None] if include_plain else []
        styles, paired = self.vocabulary.styles, pairing == "anchor_i_style_i"
        most = max(map(len, subjects.values()), default=0)
        if paired and most > len(styles):
            raise ValueError(f"data.pairing=anchor_i_style_i pairs prompt i with style i, but {most} prompts per "
                             f"object exceed the {len(styles)} styles; lower data.prompts_per_object.")
        items = [PromptItem(prompt_id(obj, style, index, seed), styled_prompt(subject, style), obj, style, seed)
                 for obj, lines in subjects.items() for index, subject in enumerate(lines)
                 for style in [*(styles[index:index + 1] if paired else styles), *plain] for seed in seeds]
        counts = Counter(item.prompt_id for item in items)
        bad = sorted(i for i, count in counts.items() if count > 1 or "." in i or "/" in i)
        if bad:
            raise ValueError(f"Prompt ids {bad[:5]} are repeated or contain '.' or '/'; object and style names "
                             f"must not contain '.', '/', '-' nor be {PLAIN!r}.")
        return items

    def exclude(self, stored: Collection[str], key: Callable[[PromptItem], str] = attrgetter("prompt_id")) -> int:
        """Leave out items whose `key` (by default the prompt id; an image writer passes the item's file name) is in
        `stored`; returns how many items remain. Call before the predict dataloader is built, identically in every
        process."""
        self.excluded, self.exclusion_key = frozenset(stored), key
        return len(self.remaining)

    @property
    def remaining(self) -> list[PromptItem]:
        return [item for item in self.items if self.exclusion_key(item) not in self.excluded]

    def predict_dataloader(self) -> DataLoader:
        items = self.remaining
        world_size = 1 if self.trainer is None else self.trainer.world_size
        if 0 < len(items) < world_size:
            raise ValueError(f"Only {len(items)} prompt items remain for {world_size} processes; every process "
                             f"needs one, so finish with --trainer.devices={len(items)}.")
        return DataLoader(items, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=list)


def erasure_targets(vocabulary: ConceptVocabulary, targets: list[str] | None, sequential: list[str] | None,
                    sequential_steps: list[int] | None) -> dict[str, tuple[str, ...]]:
    """Target label → concepts erased, in generation order: each of `targets`, then `first_{n:02d}` per
    `sequential_steps`; only `{"none": ()}` when neither is given."""
    known = vocabulary.concepts
    for option, names, allowed in (("targets", targets or [], [*known, NO_ERASURE]),
                                   ("sequential", sequential or [], known)):
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise ValueError(f"data.{option} {unknown} are not concepts of the vocabulary; expected some of {allowed}.")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"data.{option} repeats {repeated}; name each concept once.")
    if (sequential is None) != (sequential_steps is None):
        raise ValueError("data.sequential (the order) and data.sequential_steps (how many of it to erase) go together.")
    if sequential_steps is not None:
        outside = [n for n in sequential_steps if not 1 <= n <= len(sequential)]
        if outside or len(set(sequential_steps)) != len(sequential_steps):
            raise ValueError(f"data.sequential_steps must be distinct counts in 1..{len(sequential)} (the length of "
                             f"data.sequential), got {sequential_steps}.")
    erasures = {name: () if name == NO_ERASURE else (name,) for name in targets or []}
    erasures |= {f"first_{n:02d}": tuple(sequential[:n]) for n in sequential_steps or []}
    return erasures or {NO_ERASURE: ()}


def search_candidates(candidates: list[dict[str, float]] | None,
                      erasures: dict[str, tuple[str, ...]]) -> list[Candidate | None]:
    """The checked candidates of a search, in the given order; `[None]` (erase with class_params) without one."""
    if candidates is None:
        return [None]
    if not candidates:
        raise ValueError("data.candidates is empty; list at least one {percentile, multiplier} to search, or leave "
                         "it null to erase with class_params.")
    if not all(erasures.values()):
        raise ValueError(f"data.candidates rate erasing parameters, but target {NO_ERASURE!r} (listed, or no targets "
                         "given) erases nothing; list the erasing targets only.")
    searched = [Candidate.from_params(params, f"data.candidates[{index}]") for index, params in enumerate(candidates)]
    names = [candidate.name for candidate in searched]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"data.candidates repeats {repeated} (folder names, 6 significant digits); list each "
                         "candidate once.")
    return searched
