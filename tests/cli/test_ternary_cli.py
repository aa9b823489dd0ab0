"""`harness run --set fmt=ternary` on tiny-llama with a temporary SQLite database."""

import json

import pytest

QUICK = ["--model", "tiny-llama", "--max-eval-tokens", "2048", "--seq-len", "256", "--tasks", ""]


@pytest.fixture
def run_cli(cli, db_url):
    def run(*args):
        return cli(*args, "--db", db_url)
    return run


def test_rtn_ternary_runs_without_bits(run_cli, tmp_path):
    code, out, err = run_cli("run", "--methods", "rtn", "--set", "fmt=ternary", *QUICK,
                             "--output-dir", tmp_path / "runs")
    assert code == 0, err
    code, out, err = run_cli("run", "--methods", "rtn", "--set", "fmt=ternary", "--set",
                             "scaling=absmax", *QUICK, "--output-dir", tmp_path / "runs")
    assert code == 0, err
    runs = {}
    for r in json.loads(run_cli("list", "--json")[1]):
        r["config"] = json.loads(run_cli("show", r["run_key"], "--json")[1])["spec"]["config"]
        runs[(r["method"], r["config"].get("scaling"))] = r
    for scaling in ("absmean", "absmax"):
        run = runs[("rtn", scaling)]
        assert run["status"] == "finished" and run["fmt"] == "ternary"
        assert run["config"]["fmt"] == "ternary" and run["config"]["bits"] == 2
        g = run["config"]["group_size"]
        # 5 trits per byte + one fp16 scale per group, measured from the packed tensors
        assert run["metrics"]["bits_per_weight"] == pytest.approx(1.6 + 16 / g, rel=1e-3)
        assert run["metrics"]["ppl"] > 0
    assert runs[("rtn", "absmean")]["run_key"] != runs[("rtn", "absmax")]["run_key"]


@pytest.mark.parametrize("args,needle", [
    (["--bits", "3", "--set", "fmt=ternary"], "ternary is fixed at 1.58 bits"),
    (["--set", "scaling=absmax"], "scaling does not apply to fmt="),
    (["--set", "fmt=binary"], "--methods onebit"),
])
def test_bad_ternary_input_is_one_line_exit_2(run_cli, args, needle):
    code, out, err = run_cli("run", "--methods", "rtn", *args, *QUICK)
    assert code == 2, err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
