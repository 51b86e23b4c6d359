"""The command line of train.py, finetune.py and evaluate.py: every config key can be overridden,
and a bad key or config argument is one line naming it and what is valid (exit status 2)."""
import importlib
import subprocess
import sys

import ml_collections
import pytest
from ml_collections.config_flags import config_path

from tests.conftest import REPO, SHARED

SHARDS = SHARED / "fixtures" / "coyo_shards" / "shards"
# Types ml_collections' config_flags can parse from the command line.
OVERRIDABLE = (int, float, bool, str, tuple)
# Each config file with the argument it is run with (its default where it has one).
CONFIGS = [("configs.demo", None), ("configs.demo_finetune", None), ("configs.coyo_pretrain", None),
           ("configs.imagenet_finetune", None), ("configs.imagenet_finetune", "res=512"),
           ("configs.finetune", "dataset=cifar10,classes=10"),
           ("configs.finetune", "folder=/data/flowers,classes=102"),
           ("configs.demo_sweep", None), ("configs.demo_sweep", "mode=finetune"),
           ("tests.tiny_config", "/data/*.tfrecord"), ("tests.finetune_tiny_config", "/data/tfds")]


def _leaves(config: ml_collections.ConfigDict, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_config_file_is_listed():
    listed = {name for name, _ in CONFIGS if name.startswith("configs.")}
    files = {f"configs.{p.stem}" for p in (REPO / "configs").glob("*.py")
             if "def get_config" in p.read_text()}
    assert files == listed


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_every_key_can_be_set_on_the_command_line(name, arg):
    # A key whose default is a plain None (or a list) has no type that the command line could be
    # parsed as: `--config.input.exclude_keys_file=...` once ended in "Type NoneType ... not
    # supported for overriding". Defaults of None are typed placeholders.
    module = importlib.import_module(name)
    config = module.get_config(arg) if arg is not None else module.get_config()
    bad = {path: config_path.get_type(path, config) for path in _leaves(config)
           if config_path.get_type(path, config) not in OVERRIDABLE}
    assert not bad, f"{name}:{arg} has keys the command line cannot set: {bad}"


def _run(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_keys_whose_default_is_none_are_overridden(tmp_path, shared_fixtures):
    # The exclusion list reaches the pipeline (whose complaint about its first line shows it was
    # read), after the RAM budget and the sharding rules were accepted.
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("id\nabc\n")
    result = _run("train.py", "--config", f"tests/tiny_config.py:{SHARDS}",
                  "--workdir", str(tmp_path / "run"),
                  f"--config.input.exclude_keys_file={exclude}", "--config.input.ram_budget_gb=0.5",
                  "--config.sharding_rules=(('batch', ('data', 'fsdp')), ('embed', 'fsdp'))",
                  "--config.param_sharding=(('pos_embedding', 'replicated'),)")
    assert "not supported for overriding" not in result.stderr
    assert f"exclusion list {exclude}: the first line must name the field" in result.stderr, \
        result.stderr[-2000:]


@pytest.mark.parametrize("script,args,expected", [
    ("train.py", ["--config", "configs/demo.py", "--workdir", "{tmp}", "--config.batch_sise=32"],
     "error: --config.batch_sise: config has unknown keys ['batch_sise'] (did you mean batch_size?); "
     "valid keys: ['batch_size', "),
    ("finetune.py", ["--config", "configs/finetune.py:dataset=cifar10,classes=10", "--workdir",
                     "{tmp}", "--config.init=/nowhere", "--config.model.widht=8"],
     "error: --config.model.widht: config.model has unknown keys ['widht'] (did you mean width?); "
     "valid keys: ['attention_impl', "),
    ("evaluate.py", ["--config", "configs/imagenet_finetune.py:res=384,stepz=3", "--checkpoint",
                     "{tmp}"],
     "error: --config=configs/imagenet_finetune.py:res=384,stepz=3: Unknown config argument "
     "'stepz'; valid: ['batch', 'ema', 'lr', 'res', 'steps', 'variant']. Did you mean 'steps'?"),
])
def test_a_bad_key_or_config_argument_is_one_line(tmp_path, script, args, expected):
    # Each once printed ~30 lines of chained tracebacks from inside absl's flag parsing.
    result = _run(script, *[a.replace("{tmp}", str(tmp_path)) for a in args], timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(expected), result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # nothing ran


def test_the_demo_refuses_data_files_it_would_replace(tmp_path):
    # configs/demo.py trains on the data it writes: --config.input.data.files was silently
    # replaced by WORKDIR/demo_data (and a run seemed to train on the user's shards).
    result = _run("train.py", "--config", "configs/demo.py:10", "--workdir", str(tmp_path / "w"),
                  "--config.input.data.files=/data/coyo/*.tfrecord", timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == (
        "error: config.input.data.files='/data/coyo/*.tfrecord' cannot be used with this demo "
        "config: it trains on the data it writes (config.demo_data); move that with "
        "--config.demo_data.out_dir=DIR, or train on your own data with a config without a demo "
        "section (e.g. configs/coyo_pretrain.py)")
    assert "Traceback" not in result.stderr and not (tmp_path / "w" / "demo_data").exists()


def test_help_texts_keep_their_line_continuations():
    # A plain docstring turns the `\` ending a usage line into a joined line: `--help` of
    # evaluate.py and launch_local printed "... /ckpt/run         --config.input...".
    import ast

    modules = sorted(REPO.glob("*.py")) + sorted((REPO / "coyo_vit" / "tools").glob("*.py"))
    joined = []
    for path in modules:
        source = path.read_text()
        tree = ast.parse(source)
        doc = tree.body[0] if tree.body and isinstance(tree.body[0], ast.Expr) else None
        if doc is not None and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
            if "\\\n" in ast.get_source_segment(source, doc) and " " * 9 in doc.value.value:
                joined.append(path.name)
    assert not joined, f"module docstrings whose `\\` line ends are lost (use r\"\"\"): {joined}"
