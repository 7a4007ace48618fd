"""Every user mistake: one `error:` line, a non-zero exit, no traceback, nothing published."""

from __future__ import annotations

import ast
import re

import pytest

from manifests.errors import DistilleryError
from manifests.recipes import RecipeConfig, parse_config, read_recipe
from manifests.stages import PACKAGES, package_clis, stage_table

from .conftest import ROOT, assert_one_line_error, write_recipe


def test_missing_recipe_file(cli, store):
    result = cli("--store", store.root, "run", "nope.yaml")
    assert_one_line_error(result)
    assert "nope.yaml: no such file" in result.err


def test_mistyped_key_names_it_and_suggests_the_nearest(cli, tmp_path, store):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        "stage: corpus.build\nname: c\ninputs: [{path: x}]\nsteps: [{type: min_words, min_wrods: 3}]\n",
    )
    result = cli("--store", store.root, "run", recipe)
    assert_one_line_error(result)
    assert "unknown key 'steps.0.min_wrods'; did you mean 'min_words'?" in result.err


def test_mistyped_nested_key(cli, tmp_path, store):
    recipe = write_recipe(
        tmp_path / "r.yaml", "stage: train\nname: r\nmodel: m\ndatasets: [{ref: d}]\npeft: {rank: 4}\n"
    )
    result = cli("--store", store.root, "run", recipe)
    assert_one_line_error(result)
    assert "unknown key 'peft.rank'" in result.err


def test_wrong_type(cli, tmp_path, store):
    recipe = write_recipe(
        tmp_path / "r.yaml", "stage: corpus.build\nname: c\ninputs: [{path: x}]\nworkers: many\n"
    )
    result = cli("--store", store.root, "run", recipe)
    assert_one_line_error(result)
    assert "'workers'" in result.err and "'many'" in result.err


def test_unknown_stage_and_invalid_yaml(cli, tmp_path, store):
    result = cli(
        "--store", store.root, "run", write_recipe(tmp_path / "a.yaml", "stage: corpus.buld\nname: c\n")
    )
    assert_one_line_error(result)
    assert "did you mean 'corpus.build'" in result.err
    result = cli("--store", store.root, "run", write_recipe(tmp_path / "b.yaml", "stage: [unclosed\n"))
    assert_one_line_error(result)
    assert "not valid YAML" in result.err


def test_missing_input_file(cli, tmp_path, store):
    recipe = write_recipe(
        tmp_path / "r.yaml", f"stage: corpus.build\nname: c\ninputs: [{{path: {tmp_path}/absent.jsonl}}]\n"
    )
    result = cli("--store", store.root, "corpus", "build", recipe)
    assert_one_line_error(result)
    assert "absent.jsonl: no such file" in result.err
    assert store.list() == []


def test_reference_to_a_missing_manifest(cli, tmp_path, store):
    recipe = write_recipe(
        tmp_path / "r.yaml", "stage: synth.generate\nname: s\ninput: nothing-here\nteachers: [{serve: m}]\n"
    )
    result = cli("--store", store.root, "synth", "generate", recipe)
    assert_one_line_error(result)
    assert "no dataset manifest named 'nothing-here'" in result.err
    assert_one_line_error(cli("--store", store.root, "manifests", "trace", "0123456789"))


def test_train_on_a_dataset_without_messages_names_its_columns(cli, tmp_path, store):
    assert cli("--store", store.root, "corpus", "build", "examples/recipes/demo-corpus.yaml").code == 0
    recipe = write_recipe(
        tmp_path / "r.yaml", "stage: train\nname: r\nmodel: m\ndatasets: [{ref: demo-corpus}]\n"
    )
    result = cli("--store", store.root, "train", recipe)
    assert_one_line_error(result)
    assert (
        "lacks column(s) messages (or prompt and completion) needed for SFT; it has: id, parents, text, source"
        in result.err
    )


def test_tampered_input_stops_the_next_stage(cli, tmp_path, store):
    assert cli("--store", store.root, "corpus", "build", "examples/recipes/demo-corpus.yaml").code == 0
    corpus = store.resolve("demo-corpus")
    shard = corpus.location / corpus.files[0].path
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        "stage: synth.generate\nname: s\ninput: demo-corpus\nteachers: [{serve: demo-corpus}]\n",
    )
    result = cli("--store", store.root, "synth", "generate", recipe)
    assert_one_line_error(result, code=1)
    assert "altered: data/train-00000.parquet" in result.err
    assert [m.name for m in store.list()] == ["demo-corpus"]


@pytest.mark.parametrize(
    "recipe", sorted((ROOT / "examples" / "recipes").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_recipe_validates(recipe):
    data = read_recipe(recipe)
    model = stage_table()[data["stage"]].config_class(data, str(recipe))  # (train: the method's)
    config = parse_config(model, data, str(recipe))
    assert config.resolved()["name"] == data["name"]


def _help(cli, capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli(*args, "--help")
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _commands(help_text: str) -> list[str]:
    """The subcommands a --help lists (indented under COMMAND or VERB)."""
    listed = help_text.split("positional arguments:")[1].split("options:")[0]
    return re.findall(r"^    (\S+)", listed, flags=re.M)


def test_help_everywhere(cli, capsys):
    # Every command and verb the packages register: help, and an example to copy.
    for command in _commands(_help(cli, capsys)):
        text = _help(cli, capsys, command)
        verbs = _commands(text) if command in (*PACKAGES, "manifests") else []
        assert "example" in text, command
        for verb in verbs:
            assert "example:" in _help(cli, capsys, command, verb), (command, verb)


def test_the_stage_tables_are_the_one_list_of_stages(cli, capsys, tmp_path, store):
    # Each package owns its stages and their verbs; the root knows the packages, nothing else.
    assert {p.parent.name for p in ROOT.glob("*/cli.py")} == {*PACKAGES, "manifests"}
    commands = _commands(_help(cli, capsys))
    for package, module in zip(PACKAGES, package_clis(), strict=True):
        assert package in commands
        verbs = _commands(_help(cli, capsys, package))
        for stage in module.STAGES:
            owner, _, verb = stage.partition(".")
            assert owner == package, stage
            assert verb in verbs or "run" in verbs, f"no verb runs stage {stage}"
    # Every stage is dispatched by `distillery run`, to its own config (which reads the recipe).
    for stage, entry in stage_table().items():
        assert issubclass(entry.config_class({"stage": stage}), RecipeConfig) and callable(entry.runner())
        recipe = write_recipe(tmp_path / f"{stage}.yaml", f"stage: {stage}\nname: x\nnot_a_key: 1\n")
        result = cli("--store", store.root, "run", recipe)
        assert_one_line_error(result)
        assert f"{recipe}: " in result.err and "unknown stage" not in result.err, result.err


def test_manifests_imports_no_stage_package():
    for path in sorted((ROOT / "manifests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and "import_module" in ast.unparse(node.func):
                names = [a.value for a in node.args if isinstance(a, ast.Constant)]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in PACKAGES, f"{path.name}:{node.lineno}: {ast.unparse(node)}"


def test_set_overrides_nested_values_and_rejects_malformed(cli, tmp_path, store):
    from manifests.overrides import apply_overrides

    data = apply_overrides({"teacher": {"model": "m"}}, ["teacher.max_new_tokens=8", "splits={train: 1.0}"])
    assert data == {"teacher": {"model": "m", "max_new_tokens": 8}, "splits": {"train": 1.0}}
    result = cli(
        "--store", store.root, "corpus", "build", "examples/recipes/demo-corpus.yaml", "--set", "workers"
    )
    assert_one_line_error(result)
    assert "expected KEY=VALUE" in result.err
    assert (
        cli(
            "--store",
            store.root,
            "corpus",
            "build",
            "examples/recipes/demo-corpus.yaml",
            "--set",
            "dedup.exact=false",
        ).code
        == 0
    )
    assert store.resolve("demo-corpus").producer.recipe["dedup"]["exact"] is False


def test_an_unwritable_store_is_one_line(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = cli("--store", blocker / "store", "corpus", "build", "examples/recipes/demo-corpus.yaml")
    assert_one_line_error(result, code=1)
    assert str(blocker) in result.err


def test_a_synth_verb_runs_only_its_own_stage(cli, store):
    result = cli("--store", store.root, "synth", "cot", "examples/recipes/demo-synth.yaml")
    assert_one_line_error(result)
    assert "stage 'synth.generate' is not a synth.cot stage" in result.err


def test_a_train_method_of_the_wrong_type_is_one_line(cli, tmp_path, store):
    recipe = write_recipe(
        tmp_path / "r.yaml", "stage: train\nmethod: [sft]\nname: r\nmodel: m\ndatasets: [{ref: d}]\n"
    )
    result = cli("--store", store.root, "train", recipe)
    assert_one_line_error(result)
    assert "unknown train method ['sft']" in result.err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--nproc", "0"], "--nproc must be at least 1 (got 0)"),
        (["--nnodes", "0"], "--nnodes must be at least 1 (got 0)"),
        (["--nnodes", "2", "--node-rank", "2"], "--node-rank must be from 0 to 1 (got 2)"),
        (["--nproc", "2", "--set", "max_steps=abc"], "'max_steps'"),
        (["--emit-slurm", "job.sbatch", "--set", "max_steps=abc"], "'max_steps'"),
        (["--nproc", "2", "--set", "stage=train.pack"], "stage train.pack runs in one process"),
    ],
)
def test_launch_mistakes_are_caught_before_torchrun(cli, tmp_path, store, monkeypatch, options, message):
    # Under torchrun every process would print the error and torchrun a traceback of its own.
    from train import launch

    monkeypatch.setattr(launch, "relaunch", lambda *a: pytest.fail("relaunched under torchrun"))
    monkeypatch.chdir(tmp_path)
    result = cli(
        "--store", store.root, "train", "run", ROOT / "examples/recipes/pretrain-tiny.yaml", *options
    )
    assert_one_line_error(result)
    assert message in result.err
    assert not (tmp_path / "job.sbatch").exists()


def test_a_failed_run_does_not_suggest_its_own_name(cli, tmp_path, store):
    # The failed pack leaves only its folder (for resume data or nothing); it is not a known dataset.
    assert cli("--store", store.root, "corpus", "build", "examples/recipes/demo-corpus.yaml").code == 0
    (store.name_dir("dataset", "demo-pack") / ".tmp-host-1-x").mkdir(parents=True)
    result = cli("--store", store.root, "run", write_recipe(tmp_path / "r.yaml", (
        "stage: train\nmethod: pretrain\nname: r\ntokenizer: t\ndatasets: [{ref: demo-pack}]\n")))  # fmt: skip
    assert_one_line_error(result)
    assert "no dataset manifest named 'demo-pack'" in result.err
    assert "'demo-pack'?" not in result.err and "did you mean 'demo-corpus'?" in result.err


def test_every_stage_names_a_missing_split_the_same_way(cli, tmp_path, store):
    assert cli("--store", store.root, "corpus", "build", "examples/recipes/demo-corpus.yaml").code == 0
    from manifests.data import require_split

    with pytest.raises(
        DistilleryError, match=r"dataset demo-corpus@\w+ has no split 'test' \(splits: train\)"
    ):
        require_split(store.resolve("demo-corpus"), "test")
    recipe = write_recipe(
        tmp_path / "t.yaml", "stage: train.tokenizer\nname: t\ndatasets: [{ref: demo-corpus, split: test}]\n"
    )
    result = cli("--store", store.root, "train", "tokenizer", recipe)
    assert_one_line_error(result)
    assert "has no split 'test' (splits: train)" in result.err
