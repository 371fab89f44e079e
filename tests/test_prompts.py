"""PromptDataModule: prompts from templates and anchor files, ids, subsets, order, exclusion and bad input."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from datamodules.prompts import PromptDataModule
from saemnesia.class_params import Candidate
from saemnesia.concepts import UNLEARNCANVAS, ConceptVocabulary
from saemnesia.generation import PromptItem

VOCABULARY = ConceptVocabulary(objects=("Bears", "Cats", "Dogs"), styles=("Cubism", "Van_Gogh"))


def write_anchor_folder(folder, prompts: dict[str, list[str]]):
    folder.mkdir()
    for obj, lines in prompts.items():
        (folder / f"sd_prompt_{obj}.txt").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return folder


def test_template_items_cover_objects_styles_plain_and_seeds_in_a_fixed_order():
    data = PromptDataModule(VOCABULARY, seeds=(188, 7))
    expected = [
        PromptItem(f"{obj}-{style or 'plain'}-000-s{seed}",
                   f"An image of {obj}." if style is None else f"An image of {obj} in {style.replace('_', ' ')} style.",
                   obj, style, seed)
        for obj in ("Bears", "Cats", "Dogs") for style in ("Cubism", "Van_Gogh", None) for seed in (188, 7)
    ]
    assert data.items == expected
    assert data.items[2].prompt == "An image of Bears in Van Gogh style."  # styles with spaces (docs/method.md §6)
    assert data.vocabulary == VOCABULARY


def test_subsets_and_limits_select_items_and_the_run_vocabulary():
    data = PromptDataModule(VOCABULARY, objects=["Dogs", "Bears"], styles=["Van_Gogh"], include_plain=False)
    assert [(item.object, item.style) for item in data.items] == [("Bears", "Van_Gogh"), ("Dogs", "Van_Gogh")]
    assert data.vocabulary == ConceptVocabulary(objects=("Bears", "Dogs"), styles=("Van_Gogh",))  # vocabulary order
    plain_only = PromptDataModule(VOCABULARY, styles=[])
    assert [item.prompt for item in plain_only.items] == [f"An image of {obj}." for obj in ("Bears", "Cats", "Dogs")]
    assert PromptDataModule(VOCABULARY, limit=4).items == PromptDataModule(VOCABULARY).items[:4]
    assert len(PromptDataModule().items) == len(UNLEARNCANVAS.objects) * (len(UNLEARNCANVAS.styles) + 1)


def test_a_named_vocabulary_prompts_as_its_listed_names():
    toy = ConceptVocabulary(objects=tuple("Circle Square Triangle Star Cross Heart Moon Ring".split()),
                            styles=tuple("Pop_Art Blueprint Sunset Greenfield Mosaic Ink_Art Neon Pastel".split()))
    assert PromptDataModule("toy").items == PromptDataModule(toy).items
    seed_images = PromptDataModule("unlearncanvas_seed_images", objects=["Bears"], include_plain=False)
    rust = UNLEARNCANVAS.styles.index("Rust")
    assert [item.style for item in seed_images.items] == [*UNLEARNCANVAS.styles[:rust + 1], "Seed_Images",
                                                          *UNLEARNCANVAS.styles[rust + 1:]]
    assert seed_images.items[rust + 1].prompt == "An image of Bears in Seed Images style."


def test_shuffle_is_a_fixed_permutation_and_limit_a_random_subset():
    ordered = PromptDataModule(VOCABULARY, seeds=(0, 1, 2)).items
    shuffled = PromptDataModule(VOCABULARY, seeds=(0, 1, 2), shuffle=True, shuffle_seed=3).items
    assert shuffled == PromptDataModule(VOCABULARY, seeds=(0, 1, 2), shuffle=True, shuffle_seed=3).items
    assert shuffled != ordered and sorted(shuffled) == sorted(ordered)
    assert PromptDataModule(VOCABULARY, seeds=(0, 1, 2), shuffle=True, shuffle_seed=3, limit=5).items == shuffled[:5]


def test_anchor_prompts_with_styles_plain_and_prompts_per_object(tmp_path):
    folder = write_anchor_folder(tmp_path / "anchors", {
        "Bears": ["A bear playing a violin.", "  A bear in the snow  ", "A third bear."],
        "Cats": ["A cat on a roof."],
        "Dogs": ["A dog.", "Two dogs."],
        "Unused": ["Not a class of the run."],
    })
    data = PromptDataModule(VOCABULARY, objects=["Bears", "Dogs"], styles=["Van_Gogh"], anchor_prompts=str(folder),
                            prompts_per_object=2)
    assert [(item.prompt_id, item.prompt) for item in data.items] == [
        ("Bears-Van_Gogh-000-s188", "A bear playing a violin in Van Gogh style."),
        ("Bears-plain-000-s188", "A bear playing a violin."),
        ("Bears-Van_Gogh-001-s188", "A bear in the snow in Van Gogh style."),
        ("Bears-plain-001-s188", "A bear in the snow."),
        ("Dogs-Van_Gogh-000-s188", "A dog in Van Gogh style."),
        ("Dogs-plain-000-s188", "A dog."),
        ("Dogs-Van_Gogh-001-s188", "Two dogs in Van Gogh style."),
        ("Dogs-plain-001-s188", "Two dogs."),
    ]
    assert len(PromptDataModule(VOCABULARY, anchor_prompts=str(folder)).items) == (3 + 1 + 2) * 3


def test_anchor_i_style_i_pairs_each_anchor_prompt_with_one_style(tmp_path):
    folder = write_anchor_folder(tmp_path / "anchors", {"Bears": ["A bear.", "Two bears."], "Cats": ["A cat."]})
    anchored = PromptDataModule(VOCABULARY, objects=["Bears", "Cats"], anchor_prompts=str(folder),
                                pairing="anchor_i_style_i")
    assert [item.prompt_id for item in anchored.items] == [  # prompt i with style i, and every prompt plainly
        "Bears-Cubism-000-s188", "Bears-plain-000-s188", "Bears-Van_Gogh-001-s188", "Bears-plain-001-s188",
        "Cats-Cubism-000-s188", "Cats-plain-000-s188"]
    assert anchored.items[2].prompt == "Two bears in Van Gogh style."


def test_search_candidates_repeat_the_erasing_items_candidate_by_candidate():
    candidates = [{"percentile": 99.999, "multiplier": -1}, {"percentile": 99.99, "multiplier": -5.0}]
    data = PromptDataModule(VOCABULARY, objects=["Bears", "Cats"], styles=[], targets=["Bears", "Cats"],
                            candidates=candidates)
    plain = PromptDataModule(VOCABULARY, objects=["Bears", "Cats"], styles=[], targets=["Bears", "Cats"]).items
    assert [item.candidate for item in plain] == [None] * 4
    expected = [item._replace(candidate=Candidate(**params)) for params in candidates for item in plain]
    assert data.items == expected  # every target's items under each candidate in turn, the same prompt ids
    assert [item.candidate.name for item in data.items[::4]] == ["p99.999_m-1", "p99.99_m-5"]


def test_excluded_items_are_not_batched_and_batches_keep_the_order():
    data = PromptDataModule(VOCABULARY, batch_size=4)
    stored = {item.prompt_id for item in data.items[1:6]}
    assert data.exclude(stored) == len(data.items) - 5
    batches = list(data.predict_dataloader())
    expected = [item for item in data.items if item.prompt_id not in stored]
    assert batches == [expected[i:i + 4] for i in range(0, len(expected), 4)]
    assert list(data.predict_dataloader()) == batches


def test_fewer_remaining_items_than_processes_is_refused():
    data = PromptDataModule(VOCABULARY, objects=["Bears"], styles=[])
    data.trainer = SimpleNamespace(world_size=4)
    with pytest.raises(ValueError, match=r"Only 1 prompt items remain for 4 processes; .*--trainer.devices=1"):
        data.predict_dataloader()


def test_bad_selections_fail_with_one_sentence(tmp_path):
    with pytest.raises(ValueError, match=r"data.vocabulary 'toys' is not a known vocabulary; expected \{objects, "
                                         r"styles\} or one of \['toy', 'unlearncanvas', 'unlearncanvas_seed_images'\]"):
        PromptDataModule("toys")
    folder = write_anchor_folder(tmp_path / "anchors", {"Bears": ["A bear."]})
    with pytest.raises(FileNotFoundError, match=r"has no prompt file for classes \['Cats', 'Dogs'\]; expected "
                                                r"sd_prompt_\{Object\}.txt"):
        PromptDataModule(VOCABULARY, anchor_prompts=str(folder))
    with pytest.raises(FileNotFoundError, match="data.anchor_prompts folder .*missing does not exist"):
        PromptDataModule(VOCABULARY, anchor_prompts=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"prompts_per_object=2 exceeds the anchor prompts of \{'Bears': 1\}"):
        PromptDataModule(VOCABULARY, objects=["Bears"], anchor_prompts=str(folder), prompts_per_object=2)
    with pytest.raises(ValueError, match="prompts_per_object selects anchor prompts; it needs data.anchor_prompts"):
        PromptDataModule(VOCABULARY, prompts_per_object=2)
    with pytest.raises(ValueError, match=r"data.styles \['Monet'\] are not in the vocabulary"):
        PromptDataModule(VOCABULARY, styles=["Monet"])
    with pytest.raises(ValueError, match="data.seeds must be a non-empty list of distinct seeds"):
        PromptDataModule(VOCABULARY, seeds=(1, 1))
    with pytest.raises(ValueError, match="The prompt selection is empty"):
        PromptDataModule(VOCABULARY, styles=[], include_plain=False)
    with pytest.raises(ValueError, match="data.pairing must be 'all' or 'anchor_i_style_i', got 'diagonal'"):
        PromptDataModule(VOCABULARY, pairing="diagonal")
    clashing = ConceptVocabulary(objects=("A", "A-B"), styles=("C", "B-C"))  # A + B-C and A-B + C give one id
    with pytest.raises(ValueError, match=r"Prompt ids \['A-B-C-000-s188'\] are repeated or contain '\.' or '/'"):
        PromptDataModule(clashing, include_plain=False, seeds=(188,))
    with pytest.raises(ValueError, match=r"Prompt ids \['Mr\.Bear-plain-000-s188'\]"):
        PromptDataModule(ConceptVocabulary(objects=("Mr.Bear",)))
    with pytest.raises(ValueError, match=r"data.sequential \['Horses'\] are not concepts of the vocabulary"):
        PromptDataModule(VOCABULARY, sequential=["Bears", "Horses"], sequential_steps=[1, 2])
    with pytest.raises(ValueError, match=r"data.sequential repeats \['Bears'\]; name each concept once"):
        PromptDataModule(VOCABULARY, sequential=["Bears", "Bears"], sequential_steps=[1])
    with pytest.raises(ValueError, match=r"data.sequential_steps must be distinct counts in 1..2 \(the length of "
                                         r"data.sequential\), got \[1, 4\]"):
        PromptDataModule(VOCABULARY, sequential=["Bears", "Cats"], sequential_steps=[1, 4])
    with pytest.raises(ValueError, match="data.sequential .the order. and data.sequential_steps .how many of it to "
                                         "erase. go together"):
        PromptDataModule(VOCABULARY, sequential=["Bears", "Cats"])
    with pytest.raises(ValueError, match=r"data.candidates repeats \['p99.999_m-5'\] \(folder names"):
        PromptDataModule(VOCABULARY, targets=["Bears"], candidates=[{"percentile": 99.999, "multiplier": -5}] * 2)
    with pytest.raises(ValueError, match=r"data.candidates\[1\]: the entry of 'candidate' must have 'percentile'"):
        PromptDataModule(VOCABULARY, targets=["Bears"], candidates=[{"percentile": 99.9, "multiplier": -5},
                                                                    {"multiplier": -1}])
