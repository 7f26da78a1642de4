"""--exclude PATTERN: groups touching a matching node, tensor or weight keep their full width,
are listed with the skipped groups, and a pattern matching nothing is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import check_pruned
from graphs import Builder, calib_for, tiny_resnet, tiny_vgg

import onnxprune
from onnxprune import cli
from onnxprune.errors import OptionError

ERROR = "onnxprune: error: "
# tiny_vgg: conv3 (8 ch) -> relu4 -> conv6 (16 ch, BN folded in) -> relu12 -> maxpool13 -> conv16 (16 ch)
# -> relu17 -> flatten18 -> gemm21. Its prunable groups are named after their producers.
FULL = {"conv3": 8, "conv6": 16, "conv16": 16}


def widths(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """(output channels, input channels) of each Conv / Gemm, by node name, from its weights."""
    inits = {t.name: t.dims for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "Conv":
            out[n.name] = (inits[n.input[1]][0], inits[n.input[1]][1])
        elif n.op_type == "Gemm":
            out[n.name] = (inits[n.input[1]][0], inits[n.input[1]][1])  # transB=1: [N, K]
    return out


def prune(model, x, **kw) -> onnxprune.PruneResult:
    result = onnxprune.prune(model, x, measure_latency=False, **kw)
    check_pruned(result.model, model, x, max_rel_err=0.8)
    return result


@pytest.mark.parametrize("patterns,kept", [
    (("relu4_out",), {"conv3"}),  # a tensor: the group it carries
    (("conv1?",), {"conv6", "conv16"}),  # a node: conv16 reads conv6's channels and produces its own
    (("w5",), {"conv3", "conv6"}),  # a weight (renamed when its BN was folded): its layer, as a node
    (("relu4_out", "gemm*"), {"conv3", "conv16"}),  # repeated: each pattern; the classifier reads conv16's
], ids=["tensor", "node-glob", "folded-weight", "two-patterns"])
@pytest.mark.parametrize("allocation", ["uniform", "sensitivity"])
def test_excluded_groups_keep_every_channel_while_the_rest_is_pruned(patterns, kept, allocation):
    model = tiny_vgg()
    x = calib_for(model, 64)
    result = prune(model, x, speedup=1.15, allocation=allocation, exclude=patterns)
    w = widths(result.model)
    for name in kept:
        assert w[name][0] == FULL[name], (name, w)  # the producer keeps every filter …
    if "conv3" in kept:
        assert w["conv6"][1] == 8  # … and its consumer every input channel
    if "conv16" in kept:
        assert w["gemm21"][1] == 16 * 16
    rest = set(FULL) - kept
    assert (all if allocation == "uniform" else any)(w[name][0] < FULL[name] for name in rest), w  # rest pruned
    assert result.report.totals.macs_speedup >= 1.15
    reasons = dict(result.report.skipped)
    for name in kept:
        assert reasons[name] in {f"excluded by --exclude {p}" for p in patterns}, reasons
    assert not {name for name, r in reasons.items() if r.startswith("excluded")} - kept
    assert {name for name in kept if reasons[name] == "excluded by --exclude gemm*"} <= {"conv16"}
    assert {g.name for g in result.report.groups}.isdisjoint(kept)  # no excluded group was cut


def test_without_exclude_every_group_is_cut():
    """Control: with one keep ratio for all, every group of tiny_vgg is cut at this target, so
    the full widths above are the option's doing."""
    model = tiny_vgg()
    x = calib_for(model, 64)
    result = prune(model, x, speedup=1.15, allocation="uniform")
    assert not any(r.startswith("excluded") for _, r in result.report.skipped)
    w = widths(result.model)
    assert all(w[name][0] < FULL[name] for name in FULL), w


def test_excluding_a_residual_add_keeps_its_coupled_group():
    """A through node (the block's Add) excludes the coupled group summed there, even with
    --prune-residual; the other groups are pruned."""
    model = tiny_resnet()
    x = calib_for(model, 64)
    result = prune(model, x, speedup=1.3, prune_coupled=True, exclude=("add12",))
    reasons = dict(result.report.skipped)
    assert reasons["conv3+conv11"] == "excluded by --exclude add12"
    w = widths(result.model)
    assert w["conv3"][0] == w["conv11"][0] == 8 and w["conv16"][1] == w["conv23"][1] == 8
    assert "conv3+conv11" not in {g.name for g in result.report.groups}
    assert result.report.groups  # something else was pruned


def test_excluding_the_reader_of_a_concat_keeps_both_parts():
    """Channels that flow through a Concat into an excluded conv: both producers keep their width."""
    b = Builder()
    a = b.node("Relu", [b.conv("input", 3, 8)])
    c = b.node("Relu", [b.conv("input", 3, 8)])
    cat = b.node("Concat", [a, c], axis=1)
    y = b.node("Relu", [b.conv(cat, 16, 16)])
    y = b.node("Relu", [b.conv(y, 16, 16)])
    model = b.build(b.node("GlobalAveragePool", [b.conv(y, 16, 8)]))
    reader = model.graph.node[5].name  # the conv reading the Concat
    x = calib_for(model, 64)
    result = prune(model, x, speedup=1.2, allocation="uniform", exclude=(reader,))
    w = widths(result.model)
    first, second = model.graph.node[0].name, model.graph.node[2].name
    assert w[first][0] == w[second][0] == 8 and w[reader][1] == 16
    reasons = dict(result.report.skipped)
    assert reasons[first] == reasons[second] == reasons[reader] == f"excluded by --exclude {reader}"
    middle = model.graph.node[7].name  # the next conv: its group is pruned
    assert w[middle][0] < 16 and middle not in reasons


def test_pattern_matching_nothing_is_an_option_error():
    model = tiny_vgg()
    with pytest.raises(OptionError, match=r"--exclude 'conv9\*' matches no node or tensor"):
        onnxprune.prune(model, calib_for(model, 16), exclude=("conv3", "conv9*"), measure_latency=False)


@pytest.mark.parametrize("options,message", [
    ({"exclude": ("",)}, "--exclude needs a name pattern"),
    ({"exclude": ("conv3",), "method": "stripe"}, "not to --method stripe"),
])
def test_bad_exclude_options(options, message):
    with pytest.raises(OptionError, match=message):
        onnxprune.PruneOptions(**options).validate()


def test_options_take_a_single_pattern_or_any_sequence():
    assert onnxprune.PruneOptions(exclude="conv3").validate().exclude == ("conv3",)
    assert onnxprune.PruneOptions(exclude=["a", "b*"]).validate().exclude == ("a", "b*")
    assert onnxprune.PruneOptions().validate().exclude == ()


def _files(tmp: Path) -> tuple[Path, Path]:
    model = tiny_vgg()
    onnx.save_model(model, tmp / "m.onnx")
    np.save(tmp / "c.npy", calib_for(model, 64))
    return tmp / "m.onnx", tmp / "c.npy"


def test_cli_repeated_exclude_reaches_the_report(tmp_path, capfd):
    model, calib = _files(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = cli.main([str(model), "--calib", str(calib), "--speedup", "1.15", "--round-to", "1", "--no-latency",
                     "--exclude", "relu4_out", "--exclude", "gemm*", "-o", str(out), "--report", str(report), "-q",
                     "--max-drop", "0.99"])  # a random-weight model: fidelity is not what is tested
    assert code == 0, capfd.readouterr().err
    original = onnx.load(model)
    check_pruned(onnx.load(out), original, calib_for(original, 16), max_rel_err=0.8)
    skipped = {s["group"]: s["reason"] for s in json.loads(report.read_text())["skipped"]}
    assert skipped["conv3"] == "excluded by --exclude relu4_out"
    assert skipped["conv16"] == "excluded by --exclude gemm*"
    w = widths(onnx.load(out))
    assert w["conv3"][0] == 8 and w["conv16"][0] == 16 and w["conv6"][0] < 16


def test_cli_bad_pattern_is_one_line_exit_2(tmp_path, capfd):
    model, calib = _files(tmp_path)
    capfd.readouterr()
    code = cli.main([str(model), "--calib", str(calib), "--exclude", "conv3", "--exclude", "no_such_layer*",
                     "-o", str(tmp_path / "out.onnx")])
    err = capfd.readouterr().err.splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(ERROR) and "--exclude 'no_such_layer*'" in err[0], err
    assert not (tmp_path / "out.onnx").exists()
