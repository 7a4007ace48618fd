"""``distillery synth …`` (one verb per synth stage, each running recipes of that stage only) and
``distillery serve`` (a local OpenAI-compatible endpoint for development and tests)."""

from __future__ import annotations

import argparse

from manifests.verbs import Stage, add_config_options, add_group, add_recipe_verb, add_verb

STAGES = {
    "synth.generate": Stage("synth.generate:GenerateConfig", "synth.generate:run_recipe"),
    "synth.cot": Stage("synth.cot:CotConfig", "synth.cot:run_recipe"),
    "synth.preferences": Stage("synth.preferences:PreferencesConfig", "synth.preferences:run_recipe"),
    "synth.augment": Stage("synth.augment:AugmentConfig", "synth.augment:run_recipe"),
    "synth.mine": Stage("synth.mine:MineConfig", "synth.mine:run_recipe"),
    "synth.loop": Stage("synth.loop:LoopConfig", "synth.loop:run_recipe"),
}
"""The synth recipe stages (``stage:`` → config, run function); each has the verb of its name."""

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
    "mine": ("the candidates the student is weak on",
             "Score candidate prompts with the student (loss on a teacher answer, pass@k of its own sampled\n"
             "answers, KL to a white-box teacher, entropy, self-consistency), keep the hardest within a\n"
             "fraction, threshold or teacher-token budget, per stratum and away from near-copies; the rest\n"
             "go to the ledger with their scores.", "synth-mine.yaml"),
    "loop": ("rounds of mine, teacher, train and eval",
             "Round after round: mine the candidates with the newest student, have the teacher answer\n"
             "the kept ones, train, evaluate; until a round budget, a teacher-token budget or no gain.\n"
             "A killed loop started again resumes at the step it reached, paying no request twice.",
             "synth-loop.yaml"),
}  # fmt: skip
"""verb → (what it makes, description, example recipe in examples/recipes)."""


def _serve(args: argparse.Namespace) -> int:
    from synth.serve import run

    return run(args)


def _serve_options(parser: argparse.ArgumentParser) -> None:
    from synth.serve import FaultOptions, ServeOptions
    from synth.serve_batch import BatchOptions

    parser.add_argument(
        "model", metavar="MODEL", help="run reference of a checkpoint in the store, or 'echo'"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    for options in (ServeOptions, FaultOptions, BatchOptions):
        add_config_options(parser, options, group=True)


def register(sub: argparse._SubParsersAction) -> None:
    verbs = add_group(
        sub, "synth", "have a teacher model write training data (answers, with per-row lineage)",
        "Generate teacher data from a dataset's records.",
        "example:\n  distillery synth generate examples/recipes/demo-synth.yaml --set limit=8\n",
        default_verb="generate",
    )  # fmt: skip
    for verb, (makes, description, example) in VERBS.items():
        add_recipe_verb(verbs, verb, stages=STAGES, expect=f"synth.{verb}",
                        help_=f"run a synth.{verb} recipe ({makes})", description=description,
                        example=f"distillery synth {verb} examples/recipes/{example}")  # fmt: skip
    add_verb(
        sub, "serve", _serve, "serve a checkpoint as a local OpenAI-compatible endpoint (with fault injection)",
        "Serve a store checkpoint (or 'echo', no model) at /v1/models, /v1/chat/completions and\n"
        "/v1/completions with batched generation, and OpenAI's Batch API (/v1/files, /v1/batches),\n"
        "until SIGINT or SIGTERM. The fault options make a share of requests fail, for testing\n"
        "clients against a misbehaving endpoint.",
        "distillery serve smollm2-135m-instruct --port 8000 --fault-429 0.1", _serve_options,
    )  # fmt: skip
