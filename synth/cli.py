"""``distillery synth …``: one verb per synth stage, each running recipes of that stage only."""

from __future__ import annotations

import argparse

VERBS = {
    "generate": ("answers to prompts made from a dataset",
                 "Build prompts from a dataset, have the teachers answer them, publish the answers\n"
                 "as a chat dataset whose rows name their parent records.", "demo-synth.yaml"),
    "cot": ("verified chain-of-thought answers",
            "Have teachers answer questions step by step; keep an answer when its final answer\n"
            "verifies (exact, numeric, symbolic math, regex or sandboxed unit tests), by rejection sampling\n"
            "or self-consistency voting; unverified questions go to the ledger.", "synth-cot.yaml"),
    "preferences": ("chosen/rejected pairs",
                    "Have teachers write candidate answers per prompt, score them (an LLM judge asked in\n"
                    "both orders, a reward model, or a verifier) and publish chosen/rejected pairs for DPO.",
                    "synth-preferences.yaml"),
    "augment": ("paraphrase, Evol-Instruct, Self-Instruct",
                "Make new instructions from a dataset of instructions: paraphrases, Evol-Instruct\n"
                "evolutions (with the paper's elimination rules) or a Self-Instruct pool grown under a ROUGE-L\n"
                "filter; optionally answered by the teacher, as SFT-ready messages.", "synth-augment-evol.yaml"),
}  # fmt: skip
"""verb → (what it makes, description, example recipe in examples/recipes)."""


def register(sub: argparse._SubParsersAction) -> None:
    from manifests.cli import add_group, add_recipe_verb

    verbs = add_group(
        sub, "synth", "have a teacher model write training data (answers, with per-row lineage)",
        "Generate teacher data from a dataset's records.",
        "example:\n  distillery synth generate examples/recipes/demo-synth.yaml --set limit=8\n",
    )  # fmt: skip
    for verb, (makes, description, example) in VERBS.items():
        add_recipe_verb(verbs, verb, expect=f"synth.{verb}", help_=f"run a synth.{verb} recipe ({makes})",
                        description=description, example=f"distillery synth {verb} examples/recipes/{example}")  # fmt: skip
