"""Experiment files: validation (one-line errors naming the key), expansion, shipped files."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.experiments import load_experiment

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "experiments").glob("*.yaml"))
# Files naming a Hugging Face id: validated without the model's config (no download in tests).
NEEDS_HUB = {"llama2-7b-bitdistiller.yaml", "llama2-7b-onebit.yaml"}


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


TINY = """
model: tiny-llama
profile: quick
eval: {max_tokens: 128, seq_len: 64}
methods:
  rtn: {}
  qat: {train: {steps: 2}}
grid:
  bits: [3, 2]
"""


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_files_validate(path):
    exp = load_experiment(path, check_model=path.name not in NEEDS_HUB)
    assert exp.specs and exp.scheduler == "ray" and exp.name == path.stem


def test_shipped_set_is_complete():
    assert {p.stem for p in SHIPPED} >= {"smoke", "smollm2-default", "smollm2-ablation",
                                         "llama2-7b-bitdistiller", "llama2-7b-onebit"}


def test_unknown_key_names_it_and_the_valid_ones(tmp_path):
    with pytest.raises(HarnessError) as err:
        load_experiment(write(tmp_path, TINY + "grids: {bits: [2]}\n"))
    msg = str(err.value)
    assert "'grids'" in msg and "valid keys" in msg and "grid" in msg and "\n" not in msg


def test_unknown_eval_key(tmp_path):
    with pytest.raises(HarnessError, match=r"eval\.maxtokens.*valid keys: seq_len, max_tokens"):
        load_experiment(write(tmp_path, TINY.replace("max_tokens: 128", "maxtokens: 128")))


def test_unknown_method_config_key_names_valid_keys(tmp_path):
    with pytest.raises(HarnessError, match=r"methods\.rtn.*'bitz'.*valid keys"):
        load_experiment(write(tmp_path, TINY.replace("rtn: {}", "rtn: {bitz: 2}")))


def test_unknown_nested_key_lists_the_keys_of_its_block(tmp_path):
    with pytest.raises(HarnessError, match=r"'train\.seqlen'.*valid keys: train\.steps, "
                       r"train\.batch_size, train\.seq_len"):
        load_experiment(write(tmp_path, TINY.replace("{steps: 2}", "{seqlen: 2}")))


def test_grid_axis_no_method_has(tmp_path):
    with pytest.raises(HarnessError, match="grid axis loss"):
        load_experiment(write(tmp_path, TINY.replace("qat: {train: {steps: 2}}", "clip: {}")
                              + "  loss: [fkl]\n"))


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(HarnessError, match="malformed YAML at line"):
        load_experiment(write(tmp_path, "methods: {rtn: [\n"))
    with pytest.raises(HarnessError, match="not found"):
        load_experiment(tmp_path / "nope.yaml")
    with pytest.raises(HarnessError, match="expected a mapping"):
        load_experiment(write(tmp_path, "- rtn\n"))
    with pytest.raises(HarnessError, match="exp.yaml is empty"):
        load_experiment(write(tmp_path, "# nothing yet\n"))


def test_unknown_method(tmp_path):
    with pytest.raises(HarnessError, match=r"exp\.yaml: methods\.rtm: unknown method 'rtm'"):
        load_experiment(write(tmp_path, TINY.replace("rtn: {}", "rtm: {}")))


def test_grid_expands_through_build_spec(tmp_path):
    from harness.models import decoder_in_features
    from harness.plan import build_spec

    exp = load_experiment(write(tmp_path, TINY))
    assert [(s.method, s.bits) for s in exp.specs] == [("rtn", 3), ("rtn", 2), ("qat", 3),
                                                        ("qat", 2)]
    same = build_spec("tiny-llama", "rtn", {"bits": 3}, "quick", 0,
                      {"max_tokens": 128, "seq_len": 64}, decoder_in_features("tiny-llama"))
    assert exp.specs[0] == same
    assert exp.specs[2].config["train"]["steps"] == 2


def test_method_grid_and_seeds(tmp_path):
    text = TINY.replace("qat: {train: {steps: 2}}",
                        "qat:\n    grid: {loss: [ce, fkl]}") + "seeds: [0, 1]\n"
    exp = load_experiment(write(tmp_path, text))
    qat = [(s.bits, s.config["loss"], s.seed) for s in exp.specs if s.method == "qat"]
    assert len(qat) == 8 and ("2", "fkl", 1) not in qat and (2, "fkl", 1) in qat


def test_cli_flags_override_the_file(tmp_path):
    from harness.cli import build_parser

    path = write(tmp_path, TINY)
    args = build_parser().parse_args(["run", str(path), "--methods", "qat", "--bits", "2",
                                      "--seed", "3", "--max-eval-tokens", "64",
                                      "--set", "train.steps=1", "--gpus-per-run", "0.5"])
    exp = load_experiment(path, cli_args=args)
    (spec,) = exp.specs
    assert (spec.method, spec.bits, spec.seed, spec.eval.max_tokens) == ("qat", 2, 3, 64)
    assert spec.config["train"]["steps"] == 1
    bad = build_parser().parse_args(["run", str(path), "--set", "nope=1"])
    with pytest.raises(HarnessError, match="nope"):
        load_experiment(path, cli_args=bad)


def test_default_file_matches_make_run_flags():
    """experiments/smollm2-default.yaml is `harness run --methods bitdistiller,onebit`."""
    from harness.cli import build_parser
    from harness.commands import _specs_from_flags

    args = build_parser().parse_args(["run", "--methods", "bitdistiller,onebit"])
    exp = load_experiment(ROOT / "experiments" / "smollm2-default.yaml")
    assert [s.spec_hash() for s in exp.specs] == [s.spec_hash() for s in _specs_from_flags(args)]


def test_cli_bad_file_is_one_line(cli, tmp_path, db_url):
    code, _, err = cli("run", write(tmp_path, TINY + "typo: 1\n"), "--db", db_url)
    assert code == 2 and "'typo'" in err and "Traceback" not in err
