"""``moemesh plan``: JSON and summary output, --previous round trip, bad input as one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import json

import pytest

from moemesh.cli.flags import Parser as _Parser
from moemesh.cli.plan import add_parser as add_plan_parser, run as run_plan


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moemesh")
    add_plan_parser(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    return parser


def _plan(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = run_plan(_parser().parse_args(["plan", *argv]))
    out, err = capsys.readouterr()
    return rc, out, err


def _write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_json_output(tmp_path, capsys):
    loads = _write(tmp_path / "loads.json", {"loads": [[6, 1, 1], [1, 1, 6]]})
    rc, out, err = _plan(["--loads", loads, "--nodes", "2", "--slots-per-node", "2", "--json"], capsys)
    assert rc == 0 and err == ""
    assert json.loads(out) == {
        "nodes": 2, "slots_per_node": 2, "moved": 8, "warnings": [],
        "layers": [
            {"replicas": {"0": [{"node": 0, "share": 0.5}, {"node": 1, "share": 0.5}],
                          "1": [{"node": 0, "share": 1.0}], "2": [{"node": 1, "share": 1.0}]},
             "balancedness": 1.0, "node_loads": [4.0, 4.0], "moved": 4, "kept_previous": False},
            {"replicas": {"0": [{"node": 0, "share": 1.0}], "1": [{"node": 1, "share": 1.0}],
                          "2": [{"node": 0, "share": 0.5}, {"node": 1, "share": 0.5}]},
             "balancedness": 1.0, "node_loads": [4.0, 4.0], "moved": 4, "kept_previous": False},
        ],
    }


def test_summary_output(tmp_path, capsys):
    loads = _write(tmp_path / "loads.json", {"loads": [[5, 3, 2, 1]]})
    rc, out, err = _plan(["--loads", loads, "--nodes", "2", "--slots-per-node", "2"], capsys)
    assert rc == 0 and err == ""
    assert out == ("2 nodes x 2 slots\n"
                   "layer 0: balancedness 0.9167, 4 replicas of 4 experts (0 replicated), moved 4 (new placement)\n"
                   "  node loads: 6 5\n"
                   "moved: 4 replicas in total\n")


def test_output_is_a_valid_previous(tmp_path, capsys):
    loads = _write(tmp_path / "loads.json", {"loads": [[465] + [1] * 31, [3] * 16 + [1] * 16]})
    flags = ["--loads", loads, "--nodes", "4", "--slots-per-node", "10", "--json"]
    rc, out, _ = _plan(flags, capsys)
    assert rc == 0
    first = json.loads(out)
    previous = _write(tmp_path / "plan.json", out)
    rc, out, err = _plan([*flags, "--previous", previous], capsys)
    assert rc == 0 and err == ""
    second = json.loads(out)
    assert second["moved"] == 0 and [layer["moved"] for layer in second["layers"]] == [0, 0]
    assert [layer["replicas"] for layer in second["layers"]] == [layer["replicas"] for layer in first["layers"]]
    assert all(layer["kept_previous"] for layer in second["layers"])
    # and the re-plan is itself a valid --previous
    rc, _, err = _plan([*flags, "--previous", _write(tmp_path / "plan2.json", out)], capsys)
    assert rc == 0 and err == ""


def test_previous_with_very_different_loads_moves(tmp_path, capsys):
    before = _write(tmp_path / "before.json", {"loads": [[465] + [1] * 31]})
    after = _write(tmp_path / "after.json", {"loads": [[1] * 31 + [465]]})
    shape = ["--nodes", "4", "--slots-per-node", "10", "--json"]
    _, out, _ = _plan(["--loads", before, *shape], capsys)
    previous = _write(tmp_path / "plan.json", out)
    rc, out, _ = _plan(["--loads", after, *shape, "--previous", previous], capsys)
    plan = json.loads(out)
    assert rc == 0 and plan["moved"] > 0 and plan["layers"][0]["balancedness"] == pytest.approx(1.0, abs=1e-12)
    rc, out, _ = _plan(["--loads", after, *shape, "--previous", previous, "--min-balance", "0.01"], capsys)
    kept = json.loads(out)
    assert rc == 0 and kept["moved"] == 0 and kept["layers"][0]["balancedness"] < 0.5


BAD_LOADS = [
    ({"loads": [[1, -2]]}, ["--nodes", "1", "--slots-per-node", "2"], "layer 0 expert 1 must be a finite number >= 0"),
    ({"loads": [[1, 2], [3]]}, ["--nodes", "1", "--slots-per-node", "2"], "ragged loads"),
    ({"loads": [[1, "a"]]}, ["--nodes", "1", "--slots-per-node", "2"], "is not a number"),
    ({"loads": [[1, None]]}, ["--nodes", "1", "--slots-per-node", "2"], "is not a number"),
    ({"loads": []}, ["--nodes", "1", "--slots-per-node", "2"], "non-empty"),
    ({"load": [[1]]}, ["--nodes", "1", "--slots-per-node", "2"], "must be a JSON object"),
    ([[1, 2]], ["--nodes", "1", "--slots-per-node", "2"], "must be a JSON object"),
    ({"loads": [[1, 2, 3]]}, ["--nodes", "1", "--slots-per-node", "2"], "2 slots per layer, fewer than the 3 experts"),
    ({"loads": [[1]]}, ["--nodes", "0", "--slots-per-node", "2"], "nodes must be an integer >= 1"),
    ({"loads": [[1]]}, ["--nodes", "1", "--slots-per-node", "-1"], "slots per node must be an integer >= 1"),
    ('{"loads": [[1, 2]', ["--nodes", "1", "--slots-per-node", "2"], "is not valid JSON"),
    ('{"loads": [[1, NaN]]}', ["--nodes", "1", "--slots-per-node", "2"], "finite"),
]


@pytest.mark.parametrize("data, flags, message", BAD_LOADS)
def test_bad_loads(tmp_path, capsys, data, flags, message):
    rc, out, err = _plan(["--loads", _write(tmp_path / "loads.json", data), *flags], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("moemesh plan: error: ") and message in err
    assert "Traceback" not in err


def test_missing_loads_file(tmp_path, capsys):
    rc, out, err = _plan(["--loads", str(tmp_path / "nope.json"), "--nodes", "1", "--slots-per-node", "1"], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and "cannot read --loads" in err


@pytest.mark.parametrize("previous, message", [
    ({"layers": [{"replicas": {"0": [{"node": 0, "share": 1.0}]}}]}, "layer 0 has 1 experts, the loads have 2"),
    ({"layers": []}, "has 0 layers, the loads have 1"),
    ({"layers": [{"replicas": {"0": [{"node": 0, "share": 1}], "1": [{"node": 5, "share": 1}]}}]}, "outside 0..1"),
    ({"loads": [[1, 2]]}, "must be a plan's JSON"),
    ("not json", "is not valid JSON"),
])
def test_bad_previous(tmp_path, capsys, previous, message):
    loads = _write(tmp_path / "loads.json", {"loads": [[1, 2]]})
    rc, out, err = _plan(["--loads", loads, "--nodes", "2", "--slots-per-node", "1",
                          "--previous", _write(tmp_path / "prev.json", previous)], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("moemesh plan: error: ") and message in err


def test_parser_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["plan", "--loads", "x.json", "--nodes", "two", "--slots-per-node", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err


@pytest.mark.parametrize("argv, flag", [
    (["--loads", "x.json", "--nodes", "2"], "--slots-per-node"),
    (["--nodes", "2", "--slots-per-node", "1"], "--loads"),
])
def test_a_missing_flag_is_named_unless_cluster(capsys, argv, flag):
    rc, out, err = _plan(argv, capsys)  # optional for --cluster, so checked when planning a placement
    assert rc == 2 and out == "" and err == f"moemesh plan: error: {flag} is required (or --cluster for the " \
        "cluster model)\n"


def test_frontier_prints_moves_against_balance(tmp_path, capsys):
    before = _write(tmp_path / "before.json", {"loads": [[465] + [1] * 31]})
    after = _write(tmp_path / "after.json", {"loads": [[1] * 31 + [465]]})
    shape = ["--nodes", "4", "--slots-per-node", "10"]
    _, out, _ = _plan(["--loads", before, *shape, "--json"], capsys)
    previous = _write(tmp_path / "plan.json", out)
    rc, out, _ = _plan(["--loads", after, *shape, "--previous", previous, "--frontier", "--json"], capsys)
    data = json.loads(out)
    assert rc == 0 and data["fresh"]["moved"] == 40
    rows = {row["min_balance"]: (row["moved"], row["balancedness"]) for row in data["frontier"]}
    assert sorted(rows) == [0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0]
    # expert 31 (465 of 496 tokens, mean 124) alone on one node: with 3 replicas a node carries 155 + ones, over
    # 124 / 0.8 = 155, so every target needs a replica on all 4 nodes: 3 moves
    assert [rows[t][0] for t in sorted(rows)] == [3, 3, 3, 3, 3, 3, 3, 3]
    assert all(rows[t][1] >= t - 1e-9 for t in rows)
    rc, text, _ = _plan(["--loads", after, *shape, "--previous", previous, "--frontier"], capsys)
    assert rc == 0 and text.splitlines()[0].startswith("min balance") and "fresh plan" in text.splitlines()[-1]
    rc, _, err = _plan(["--loads", after, *shape, "--frontier"], capsys)
    assert rc == 2 and "--frontier needs --previous" in err
