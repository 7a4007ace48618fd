"""``distillery synth …``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from manifests.cli import add_group, add_recipe_verb

    verbs = add_group(
        sub, "synth", "have a teacher model write training data (answers, with per-row lineage)",
        "Generate teacher data from a dataset's records.",
        "example:\n  distillery synth generate examples/recipes/demo-synth.yaml --set limit=8\n",
    )  # fmt: skip
    add_recipe_verb(
        verbs, "generate", expect="synth", help_="run a synth.generate recipe",
        description="Build prompts from a dataset, have the teacher answer them, publish the answers\n"
        "as a chat dataset whose rows name their parent records.",
        example="distillery synth generate examples/recipes/demo-synth.yaml",
    )  # fmt: skip
    add_recipe_verb(
        verbs, "preferences", expect="synth", help_="run a synth.preferences recipe (chosen/rejected pairs)",
        description="Have teachers write candidate answers per prompt, score them (an LLM judge asked in\n"
        "both orders, a reward model, or a verifier) and publish chosen/rejected pairs for DPO.",
        example="distillery synth preferences examples/recipes/synth-preferences.yaml",
    )  # fmt: skip
    add_recipe_verb(
        verbs, "cot", expect="synth", help_="run a synth.cot recipe (verified chain-of-thought answers)",
        description="Have teachers answer questions step by step; keep an answer when its final answer\n"
        "verifies (exact, numeric, symbolic math, regex or sandboxed unit tests), by rejection sampling\n"
        "or self-consistency voting; unverified questions go to the ledger.",
        example="distillery synth cot examples/recipes/synth-cot.yaml",
    )  # fmt: skip
    add_recipe_verb(
        verbs, "augment", expect="synth", help_="run a synth.augment recipe (paraphrase, Evol-Instruct, Self-Instruct)",
        description="Make new instructions from a dataset of instructions: paraphrases, Evol-Instruct\n"
        "evolutions (with the paper's elimination rules) or a Self-Instruct pool grown under a ROUGE-L filter;\n"
        "optionally answered by the teacher, as SFT-ready messages.",
        example="distillery synth augment examples/recipes/synth-augment-evol.yaml",
    )  # fmt: skip
