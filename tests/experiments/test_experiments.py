"""Experiment files: validation (one-line errors naming the key), expansion, shipped files."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import build_parser
from harness.errors import HarnessError
from harness.orchestration.experiments import Experiment
from harness.orchestration.plan import plan_runs

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "experiments").glob("*.yaml"))
# Files naming a Hugging Face id: validated without the model's config (no download in tests).
NEEDS_HUB = {"llama2-7b-bitdistiller.yaml", "llama2-7b-onebit.yaml"}


def runs(path, *flags: str, check_model: bool = True) -> list:
    """The runs ``harness run PATH --no-fp FLAGS`` plans (FP references: tests/core/test_plan)."""
    args = build_parser().parse_args(["run", str(path), "--no-fp", *flags])
    return plan_runs(Experiment.from_yaml(path).with_flags(args), check_model=check_model)


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
    exp = Experiment.from_yaml(path)
    assert runs(path, check_model=path.name not in NEEDS_HUB)
    assert exp.scheduler == "ray" and exp.name == path.stem


def test_shipped_set_is_complete():
    assert {p.stem for p in SHIPPED} >= {"smoke", "smollm2-default", "smollm2-ablation",
                                         "llama2-7b-bitdistiller", "llama2-7b-onebit"}


def test_unknown_key_names_it_and_the_valid_ones(tmp_path):
    with pytest.raises(HarnessError) as err:
        runs(write(tmp_path, TINY + "grids: {bits: [2]}\n"))
    msg = str(err.value)
    assert "'grids'" in msg and "valid keys" in msg and "grid" in msg and "\n" not in msg


def test_unknown_eval_key(tmp_path):
    with pytest.raises(HarnessError, match=r"eval\.maxtokens.*valid keys: seq_len, max_tokens"):
        runs(write(tmp_path, TINY.replace("max_tokens: 128", "maxtokens: 128")))


def test_unknown_method_config_key_names_valid_keys(tmp_path):
    with pytest.raises(HarnessError, match=r"methods\.rtn.*'bitz'.*valid keys"):
        runs(write(tmp_path, TINY.replace("rtn: {}", "rtn: {bitz: 2}")))


def test_unknown_nested_key_lists_the_keys_of_its_block(tmp_path):
    with pytest.raises(HarnessError, match=r"'train\.seqlen'.*valid keys: train\.steps, "
                       r"train\.batch_size, train\.seq_len"):
        runs(write(tmp_path, TINY.replace("{steps: 2}", "{seqlen: 2}")))


def test_grid_axis_no_method_has(tmp_path):
    with pytest.raises(HarnessError, match="grid axis loss"):
        runs(write(tmp_path, TINY.replace("qat: {train: {steps: 2}}", "clip: {}")
                              + "  loss: [fkl]\n"))


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(HarnessError, match="malformed YAML at line"):
        runs(write(tmp_path, "methods: {rtn: [\n"))
    with pytest.raises(HarnessError, match="not found"):
        runs(tmp_path / "nope.yaml")
    with pytest.raises(HarnessError, match="expected a mapping"):
        runs(write(tmp_path, "- rtn\n"))
    with pytest.raises(HarnessError, match="exp.yaml is empty"):
        runs(write(tmp_path, "# nothing yet\n"))


def test_unknown_method(tmp_path):
    with pytest.raises(HarnessError, match=r"exp\.yaml: methods\.rtm: unknown method 'rtm'"):
        runs(write(tmp_path, TINY.replace("rtn: {}", "rtm: {}")))


def test_grid_expands_through_build_spec(tmp_path):
    from harness.models import decoder_in_features
    from harness.orchestration.plan import build_spec

    specs = runs(write(tmp_path, TINY))
    assert [(s.method, s.bits) for s in specs] == [("rtn", 3), ("rtn", 2), ("qat", 3), ("qat", 2)]
    same = build_spec("tiny-llama", "rtn", {"bits": 3}, "quick", 0,
                      {"max_tokens": 128, "seq_len": 64}, decoder_in_features("tiny-llama"))
    assert specs[0] == same
    assert specs[2].config["train"]["steps"] == 2


def test_method_grid_and_seeds(tmp_path):
    text = TINY.replace("qat: {train: {steps: 2}}",
                        "qat:\n    grid: {loss: [ce, fkl]}") + "seeds: [0, 1]\n"
    qat = [(s.bits, s.config["loss"], s.seed) for s in runs(write(tmp_path, text))
           if s.method == "qat"]
    assert len(qat) == 8 and ("2", "fkl", 1) not in qat and (2, "fkl", 1) in qat


def test_cli_flags_override_the_file(tmp_path):
    path = write(tmp_path, TINY)
    (spec,) = runs(path, "--methods", "qat", "--bits", "2", "--seed", "3",
                   "--max-eval-tokens", "64", "--set", "train.steps=1", "--gpus-per-run", "0.5")
    assert (spec.method, spec.bits, spec.seed, spec.eval.max_tokens) == ("qat", 2, 3, 64)
    assert spec.config["train"]["steps"] == 1
    with pytest.raises(HarnessError, match="nope"):
        runs(path, "--set", "nope=1")


def test_default_file_matches_make_run_flags():
    """experiments/smollm2-default.yaml is `harness run --methods bitdistiller,onebit`."""
    args = build_parser().parse_args(["run", "--methods", "bitdistiller,onebit"])
    from_file = plan_runs(Experiment.from_yaml(ROOT / "experiments" / "smollm2-default.yaml"))
    assert [s.spec_hash() for s in from_file] == [
        s.spec_hash() for s in plan_runs(Experiment.from_flags(args))]


def test_cli_bad_file_is_one_line(cli, tmp_path, db_url):
    code, _, err = cli("run", write(tmp_path, TINY + "typo: 1\n"), "--db", db_url)
    assert code == 2 and "'typo'" in err and "Traceback" not in err


def test_a_files_gpu_fraction_is_for_ray_only(cli, tmp_path, db_url):
    """``gpus_per_run`` in a file was taken for the flag: ``--scheduler inline`` then failed
    with "--gpus-per-run only applies to the Ray scheduler" though no flag was given."""
    text = ("model: tiny-llama\nprofile: quick\ngpus_per_run: 0.5\n"
            "eval: {max_tokens: 128, seq_len: 64, tasks: []}\nmethods: {rtn: {}}\n")
    path = write(tmp_path, text)
    exp = Experiment.from_yaml(path)
    assert exp.gpus_per_run == 0.5
    assert exp.with_flags(build_parser().parse_args(
        ["run", str(path), "--gpus-per-run", "1"])).gpus_per_run == 1
    code, _, err = cli("run", path, "--scheduler", "inline", "--no-fp", "--db", db_url,
                       "--output-dir", tmp_path / "runs")
    assert code == 0, err
    code, _, err = cli("run", path, "--scheduler", "inline", "--gpus-per-run", "1",
                       "--db", db_url, "--output-dir", tmp_path / "runs")
    assert code == 2 and "--gpus-per-run only applies to the Ray scheduler" in err
