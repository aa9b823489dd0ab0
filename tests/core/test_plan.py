import pytest

from harness.errors import HarnessError
from harness.orchestration.plan import build_spec, fp_reference

IN = {64, 192}  # tiny-llama's decoder input dims: 128 does not divide 64 -> auto picks 64


def test_spec_hash_is_stable_and_sensitive():
    a = build_spec("tiny-llama", "rtn", {"bits": 3}, "quick", 0, in_features=IN)
    b = build_spec("tiny-llama", "rtn", {"bits": 3}, "quick", 0, in_features=IN)
    c = build_spec("tiny-llama", "rtn", {"bits": 2}, "quick", 0, in_features=IN)
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()
    assert len(a.run_key) == 12


def test_when_a_run_writes_is_not_part_of_its_identity():
    import hashlib

    base = build_spec("tiny-llama", "qat", {"bits": 3}, "quick", 0, in_features=IN)
    other = build_spec("tiny-llama", "qat", {"bits": 3, "train": {"checkpoint_every": 7,
                                                                  "log_every": 5}},
                       "quick", 0, in_features=IN)
    longer = build_spec("tiny-llama", "qat", {"bits": 3, "train": {"steps": 41}}, "quick", 0,
                        in_features=IN)
    assert other.spec_hash() == base.spec_hash() != longer.spec_hash()
    # at the defaults the hash is the plain one runs stored before (their keys stay valid)
    assert base.spec_hash() == hashlib.sha256(base.canonical_json().encode()).hexdigest()


def test_auto_group_size_and_explicit_equivalent():
    auto = build_spec("tiny-llama", "rtn", {"bits": 3}, "quick", 0, in_features=IN)
    explicit = build_spec("tiny-llama", "rtn", {"bits": 3, "group_size": 64}, "quick", 0,
                          in_features=IN)
    assert auto.group_size == 64
    assert auto.spec_hash() == explicit.spec_hash()


def test_bad_group_size_lists_valid_ones():
    with pytest.raises(HarnessError, match="32"):
        build_spec("tiny-llama", "rtn", {"bits": 3, "group_size": 48}, "quick", 0, in_features=IN)


@pytest.mark.parametrize("bits", [0, 9])
def test_bits_out_of_range(bits):
    with pytest.raises(HarnessError, match="bits"):
        build_spec("tiny-llama", "rtn", {"bits": bits}, "quick", 0, in_features=IN)


def test_unknown_config_key_named():
    with pytest.raises(HarnessError, match="unknown key 'bitz'"):
        build_spec("tiny-llama", "rtn", {"bitz": 3}, "quick", 0, in_features=IN)


def test_fp_ignores_bits_and_seed():
    fp1 = build_spec("tiny-llama", "fp", {"bits": 3}, "quick", 5, in_features=IN)
    assert fp1.config == {} and fp1.seed == 0
    rtn = build_spec("tiny-llama", "rtn", {"bits": 2}, "quick", 5, in_features=IN)
    assert fp_reference(rtn).spec_hash() == fp1.spec_hash()


def test_profile_budget_applies_under_user_overrides():
    spec = build_spec("tiny-llama", "qat", {"bits": 3, "train": {"steps": 3}}, "quick", 0,
                      in_features=IN)
    assert spec.config["train"]["steps"] == 3
    assert spec.config["train"]["batch_size"] == 4  # quick profile
    onebit = build_spec("tiny-llama", "onebit", {}, "quick", 0, in_features=IN)
    from harness.train.config import TrainConfig
    from methods.onebit import OneBitConfig

    method_lr = OneBitConfig().train.lr
    assert method_lr != TrainConfig().lr
    assert onebit.config["train"]["lr"] == method_lr  # method default survives the profile


def test_bitdistiller_paper_formats():
    w3 = build_spec("tiny-llama", "bitdistiller", {"bits": 3}, "quick", 0, in_features=IN)
    w2 = build_spec("tiny-llama", "bitdistiller", {"bits": 2}, "quick", 0, in_features=IN)
    assert w3.fmt == "nf3" and w2.fmt == "int"
    with pytest.raises(HarnessError):
        build_spec("tiny-llama", "bitdistiller", {"bits": 2, "fmt": "nf3"}, "quick", 0,
                   in_features=IN)


@pytest.mark.parametrize("method", ["rtn", "clip", "qat", "bitdistiller"])
def test_every_rung_of_the_ladder_shares_format_and_data(method):
    """At one width the ladder changes one thing per rung: the same format everywhere (NF3 at
    3 bits, INT otherwise) and, for the trained rungs, the same teacher-generated data."""
    def spec(**over):
        return build_spec("tiny-llama", method, over, "quick", 0, in_features=IN)

    assert spec(bits=3).fmt == "nf3" and spec(bits=2).fmt == "int" and spec(bits=4).fmt == "int"
    assert spec(bits=3, fmt="int").fmt == "int"  # an explicit format wins
    assert spec(bits=3, symmetric=True).fmt == "int"  # NF3 has no symmetric form
    with pytest.raises(HarnessError, match="asymmetric by construction"):
        spec(bits=3, fmt="nf3", symmetric=True)
    if method in ("qat", "bitdistiller"):
        assert spec(bits=3).config["data"] == "teacher"


def test_registered_models_keep_their_run_keys():
    spec = build_spec("tiny-llama", "rtn", {"bits": 3}, "quick", 0, in_features=IN)
    assert spec.model_fingerprint is None and spec.model_key == "tiny-llama"
    assert "model_fingerprint" not in spec.canonical_json()  # hashed exactly as before


def test_a_local_folder_is_its_absolute_path_and_its_files(tmp_path, monkeypatch):
    """`--model ./ckpt` typed in two projects, or one folder retrained, was one identity:
    the second command reused the first one's results."""
    for project in ("a", "b"):
        (tmp_path / project / "ckpt").mkdir(parents=True)
        (tmp_path / project / "ckpt" / "config.json").write_text("{}")
        (tmp_path / project / "ckpt" / "model.safetensors").write_bytes(project.encode() * 10)
    specs = {}
    for project in ("a", "b"):
        monkeypatch.chdir(tmp_path / project)
        specs[project] = build_spec("./ckpt", "rtn", {"bits": 3}, "quick", 0, in_features=IN)
    assert specs["a"].model == str(tmp_path / "a" / "ckpt")
    assert specs["a"].spec_hash() != specs["b"].spec_hash()
    again = build_spec(str(tmp_path / "a" / "ckpt"), "rtn", {"bits": 3}, "quick", 0,
                       in_features=IN)
    assert again.spec_hash() == specs["a"].spec_hash()
    (tmp_path / "a" / "ckpt" / "model.safetensors").write_bytes(b"retrained, longer")
    retrained = build_spec(str(tmp_path / "a" / "ckpt"), "rtn", {"bits": 3}, "quick", 0,
                           in_features=IN)
    assert retrained.spec_hash() != specs["a"].spec_hash()
    assert retrained.model_key != specs["a"].model_key  # teacher data is another cache entry
    # the FP reference is of the checkpoint the run quantized, not of what the folder holds now
    assert fp_reference(specs["a"]).model_fingerprint == specs["a"].model_fingerprint


# --- plan_runs: the one expansion of flags and files ------------------------------------------

def _flags(*argv: str):
    from harness.cli import build_parser

    return build_parser().parse_args(["run", *argv])


def _from_flags(*argv: str) -> list:
    from harness.orchestration.experiments import Experiment
    from harness.orchestration.plan import plan_runs

    return plan_runs(Experiment.from_flags(_flags(*argv)))


def _from_file(tmp_path, text: str, *argv: str) -> list:
    from harness.orchestration.experiments import Experiment
    from harness.orchestration.plan import plan_runs

    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return plan_runs(Experiment.from_yaml(path).with_flags(_flags(str(path), *argv)))


TINY = ["--model", "tiny-llama", "--profile", "quick"]

# (flags of `harness run`, the same experiment as a file, flags after the file, runs planned)
EQUIVALENT = {
    "grid with a per-method setting": (
        [*TINY, "--methods", "rtn,qat", "--bits", "3,2", "--max-eval-tokens", "128",
         "--seq-len", "64", "--set", "train.steps=2"],
        """
model: tiny-llama
profile: quick
eval: {max_tokens: 128, seq_len: 64}
methods: {rtn: {}, qat: {train: {steps: 2}}}
grid: {bits: [3, 2]}
""", [], 5),
    "fixed widths, replicates, one group size": (
        [*TINY, "--methods", "bitdistiller,onebit,fp", "--seeds", "0,1", "--group-size", "32",
         "--tasks", ""],
        """
model: tiny-llama
profile: quick
seeds: [0, 1]
eval: {tasks: []}
methods: {bitdistiller: {}, onebit: {}, fp: {}}
grid: {group_size: [32]}
""", [], 5),
    "evaluation settings, no reference": (
        ["--model", "tiny-llama", "--profile", "full", "--methods", "rtn", "--no-fp",
         "--seed", "3", "--ppl-data", "shakespeare,wikitext2", "--num-fewshot", "0",
         "--tasks", "shakespeare_cloze", "--limit", "5"],
        """
model: tiny-llama
profile: full
seed: 3
eval: {ppl_data: [shakespeare, wikitext2], num_fewshot: 0, tasks: [shakespeare_cloze],
       limit: 5}
methods: {rtn: {}}
""", ["--no-fp"], 1),
    "make run": (["--methods", "bitdistiller,onebit", "--profile", "quick"],
                 "profile: quick\nmethods: {bitdistiller: {}, onebit: {}}\n", [], 3),
}


@pytest.mark.parametrize("flags,text,file_flags,n", EQUIVALENT.values(), ids=EQUIVALENT)
def test_flags_and_the_equivalent_file_plan_the_same_runs(tmp_path, flags, text, file_flags,
                                                           n):
    by_flags = [s.spec_hash() for s in _from_flags(*flags)]
    assert by_flags == [s.spec_hash() for s in _from_file(tmp_path, text, *file_flags)]
    assert len(by_flags) == n


def test_planned_runs_keep_the_pinned_run_keys(tmp_path):
    """The FP and RTN w3 quick runs of SmolLM2 in docs/results, through the planner: the
    automatic group size of SmolLM2 is 64."""
    pinned = ["41433650d34a", "24afcec20a77"]
    assert [s.run_key for s in _from_flags("--methods", "rtn", "--bits", "3",
                                           "--profile", "quick")] == pinned
    file = "model: smollm2-135m\nprofile: quick\nmethods: {rtn: {}}\ngrid: {bits: [3]}\n"
    assert [s.run_key for s in _from_file(tmp_path, file)] == pinned


def test_one_fp_reference_per_model_and_evaluation_first(tmp_path):
    specs = _from_flags(*TINY, "--methods", "rtn,qat", "--bits", "3,2", "--seeds", "0,1")
    assert [s.method for s in specs].count("fp") == 1 and specs[0].method == "fp"
    assert specs[0] == fp_reference(specs[1])
    # fp asked for is planned where it was asked for, not twice
    assert [s.method for s in _from_flags(*TINY, "--methods", "rtn,fp")] == ["rtn", "fp"]
    assert "fp" not in [s.method for s in _from_flags(*TINY, "--methods", "rtn", "--no-fp")]
    two = _from_file(tmp_path, "models: [tiny-llama, smollm2-135m]\nprofile: quick\n"
                               "methods: {rtn: {}}\n")
    assert [(s.method, s.model) for s in two] == [
        ("fp", "tiny-llama"), ("fp", "smollm2-135m"), ("rtn", "tiny-llama"),
        ("rtn", "smollm2-135m")]


def test_a_file_flag_given_as_zero_overrides_the_file(tmp_path):
    """``--num-fewshot 0`` after a file that says 5 is zero-shot, as without a file (it was
    taken for "not given")."""
    text = "model: tiny-llama\nprofile: quick\neval: {num_fewshot: 5}\nmethods: {rtn: {}}\n"
    [spec] = _from_file(tmp_path, text, "--no-fp", "--num-fewshot", "0")
    assert spec.eval.num_fewshot == 0
    [spec] = _from_file(tmp_path, text, "--no-fp")
    assert spec.eval.num_fewshot == 5


def test_planning_modules_import_no_private_names():
    """Planning sits below the CLI layer: experiments and plan never reach into commands, and
    no planning module borrows another module's private helpers."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "harness"
    for name in ("cli", "commands", "config", "orchestration/experiments", "orchestration/plan"):
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("harness"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"harness/{name}.py imports {private} from {node.module}"
                if name in ("orchestration/experiments", "orchestration/plan", "config"):
                    assert node.module != "harness.commands", f"harness/{name}.py"
