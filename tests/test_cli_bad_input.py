"""Every command, every option, malformed values: exit 2, one paragraph, no traceback, no output, inputs intact.

The cases are generated, not listed: each command's options are read from the
click command itself, and each option gets the bad values its type calls for
(wrong types, out-of-range and non-finite numbers, unknown choices, missing
files, folders where files belong, foreign files where a model belongs, the
input as the output) plus, for free-text options, values that break their
grammar. A second table holds valid values that the command would otherwise
ignore (an option that does not apply), which must be refused too. A
property-based test then throws arbitrary text at the free-text and numeric
options of the quick commands: whatever happens, it is a success or a clean
refusal, never a traceback.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import sntfx
from sntfx.cli import FiniteFloat, cli

# --------------------------------------------------------------------------- the files every case reads


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Valid and foreign input files, with a digest of everything so tests can prove nothing changed."""
    d = tmp_path_factory.mktemp("inputs")
    x = torch.zeros(2, 1, 8, 8)
    folded = sntfx.trace("sntfx:cnn", x)
    sntfx.save(folded, d / "folded.pt")
    sntfx.save(sntfx.transform("sntfx:cnn", x, style="linear", ratio=2), d / "snt.pt")
    from sntfx.exporters import export_onnx

    export_onnx(folded, d / "model.onnx", x)
    (d / "text.pt").write_text("not a model\n")
    (d / "random.pt").write_bytes(bytes(range(256)) * 8)
    torch.save({"weights": torch.ones(3)}, d / "plain_torch.pt")
    (d / "random.onnx").write_bytes(bytes(range(255, -1, -1)) * 8)
    (d / "model.py").write_text("raise SystemExit('importing me is a bug')\n")
    (d / "folder").mkdir()
    (d / "study.toml").write_text("sharpness_iters = 'many'\n")
    (d / "policy.toml").write_text("[[rules]]\nmatch = 1\n")
    files = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}
    return {"dir": d, "digests": files}


MODEL_ARGS = ("model", "model_file", "file", "models")


def _foreign(d: Path, command: str = "") -> list[str]:
    """Files that are not what a model argument wants (for bench, which reads ONNX: torch files)."""
    names = ["missing.pt", "text.pt", "random.pt", "plain_torch.pt", "folder"]
    names += ["folded.pt", "random.onnx"] if command == "bench" else ["model.onnx"]
    return [str(d / n) for n in names]


# --------------------------------------------------------------------------- valid baselines per command


def _baseline(command: str, d: Path, out: Path) -> list[str]:
    folded, snt, onnx = str(d / "folded.pt"), str(d / "snt.pt"), str(d / "model.onnx")
    return {
        "transform": ["transform", "sntfx:cnn", "--out", str(out / "o.pt")],
        "fold": ["fold", snt, "--out", str(out / "o.pt")],
        "inspect": ["inspect", folded],
        "train": ["train", "sntfx:cnn", "--data", "digits", "--epochs", "1", "--limit-batches", "1",
                  "--out", str(out / "o.pt")],
        "sharpness": ["sharpness", folded, "--data", "digits", "--batches", "1", "--batch-size", "8", "--iters", "1",
                      "--trace-samples", "1", "--landscape", "none", "--out", str(out / "o.json")],
        "export": ["export", folded, "--onnx", str(out / "o.onnx")],
        "bench": ["bench", onnx, "--iters", "1", "--warmup", "0", "--batch-sizes", "1", "--out", str(out / "o.json")],
        "prune": ["prune", folded, "--sparsity", "0.5", "--out", str(out / "o.pt")],
        "quantize": ["quantize", folded, "--out", str(out / "o.pt")],
        "sweep": ["sweep", folded, "--data", "digits", "--sparsities", "0.5", "--bits", "8", "--act-bits", "",
                  "--out", str(out / "o.json")],
        "study": ["study", "--model", "sntfx:cnn", "--data", "digits", "--methods", "adam", "--seeds", "0",
                  "--epochs", "1", "--limit-batches", "1", "--no-onnx", "--eval-images", "16",
                  "--out", str(out / "study")],
    }[command]


INPUT_OF = {"fold": "snt.pt", "sharpness": "folded.pt", "export": "folded.pt", "bench": "model.onnx",
            "prune": "folded.pt", "quantize": "folded.pt", "sweep": "folded.pt"}
COMMANDS = ["transform", "fold", "inspect", "train", "sharpness", "export", "bench", "prune", "quantize", "sweep",
            "study"]

# Free-text options: values that break each one's grammar or name something that does not exist.
TEXT_VALUES = {
    "input_shape": ["abc", "1,-3,8,8", "0", "1"],
    "kwargs": ["{", "[1, 2]", '"text"', '{"no_such_argument": 1}'],
    "entry": ["no_such_factory", "1bad name"],
    "pipeline": ["no_such_pass", "snt(style=zzz)", "snt(", "snt(ratio=0)"],
    "nm_pattern": ["2-4", "4:2", "x:y", "0:4"],
    "batch_sizes": ["a,b", "0", "", "-1,8"],
    "sparsities": ["x", "1.5", "-0.1", "0.5,,nan", "0.5,0.5"],
    "channel_sparsities": ["x", "1.0", "-0.2"],
    "bits": ["9", "x", "1", "8.5", "8,8"],
    "mse_bits": ["9", "x", "1", "4,4"],
    "act_bits": ["4", "8:2", "x:y", "8:8:8"],
    "methods": ["bogus", "snt-nope", "", "adam,adam", "snt-linear-x0"],
    "seeds": ["x", "-1", "0,0", ""],
    "models": ["nosuch:thing", "missing.py", "torchvision:no_such_net", ""],
    "data_name": ["no-such-dataset", ""],
    "device": ["bogus", "cuda:x", ""],
    "exclude": ["", " "],
}

# Valid values that the command would ignore in this invocation: they must be refused, not dropped.
IGNORED = {
    "train": [["--sam-base", "sgd"], ["--rho", "0.1"], ["--adaptive"], ["--sync-bn"], ["--warmup-epochs", "1"],
              ["--model-file", "{d}/folder/../model.py"], ["--trust-source"], ["--data-dir", "{d}/folder"],
              ["--pretrained"]],
    "prune": [["--nm", "2:4"], ["--importance", "lamp"], ["--round-to", "8"], ["--lr", "0.01"],
              ["--method", "nm"], ["--method", "structured", "--scope", "global", "--importance", "taylor"]],
    "quantize": [["--act-method", "mse"], ["--calib-batches", "4"], ["--abits", "8"],
                 ["--data-dir", "{d}/folder"]],
    "export": [["--calib-method", "mse"], ["--min-agreement", "0.5"], ["--calib-batches", "4"], ["--int8"],
               ["--exclude", "features.0"],
               ["--data-dir", "{d}/folder"]],
    "inspect": [["--data", "digits"], ["--data-dir", "{d}/folder"]],
    "transform": [["--ratio", "2"], ["--style", "branch", "--ratio", "2"], ["--entry", "build_model"],
                  ["--data-dir", "{d}/folder"], ["--pretrained"], ["--budget", "none", "--memory-budget", "0.2"],
                  ["--passes", "snt", "--budget", "0.2"], ["--passes", "snt", "--memory-budget", "0.2"],
                  ["--passes", "snt", "--batch-size", "64"]],
    "bench": [["--data-dir", "{d}/folder"]],
    "study": [["--report-only"], ["--report-only", "--epochs", "2"]],
}


def _option(cmd: click.Command, name: str) -> click.Parameter:
    return next(p for p in cmd.params if p.name == name)


def _bad_values(param: click.Parameter, d: Path, command: str) -> list[str]:
    """The malformed values this parameter's type calls for."""
    t = param.type
    if isinstance(param, click.Option) and param.is_flag:
        return []
    if isinstance(t, click.IntRange):
        values = ["abc", "1.5", ""]
        if t.min is not None:
            values.append(str(t.min - 1))
        if t.max is not None:
            values.append(str(t.max + 1))
        return values
    if isinstance(t, FiniteFloat):
        values = ["nan", "inf", "-inf", "abc"]
        if t.low is not None:
            values.append(str(t.low - 1))
        if t.high is not None:
            values.append(str(t.high + (0 if t.high_open else 1)))
        return values
    if t is click.INT or isinstance(t, click.types.IntParamType):
        return ["abc", "1.5", ""] + (["1", "9"] if param.name in ("wbits", "abits") else [])
    if isinstance(t, click.Choice):
        return ["no-such-choice", ""]
    if isinstance(t, click.Path):
        values = [str(d / "missing" / "x")] if t.exists or param.name in ("out", "onnx_path", "report_path", "state_dict_path") else []
        if not t.file_okay:
            values.append(str(d / "text.pt"))
        if not t.dir_okay:
            values.append(str(d / "folder"))
        if param.name in ("out", "onnx_path", "report_path", "state_dict_path") and command in INPUT_OF:
            values.append(str(d / INPUT_OF[command]))  # the command's own input
        if param.name == "config_file":
            values.append(str(d / "study.toml"))
        if param.name == "policy":
            values.append(str(d / "policy.toml"))
        if param.name == "source_file":
            values.append(str(d / "model.onnx"))
        if param.name in MODEL_ARGS:
            values += [v for v in _foreign(d, command) if v not in values]
        return values
    if param.name in TEXT_VALUES:
        return TEXT_VALUES[param.name]
    if param.name in MODEL_ARGS:
        return _foreign(d, command)
    raise AssertionError(f"no bad values defined for {command} {param.name} ({t!r}): add them to this test")


def _with(argv: list[str], param: click.Parameter, value: str) -> list[str]:
    """``argv`` with ``param`` set to ``value`` (replacing the baseline's value or the positional argument)."""
    if isinstance(param, click.Argument):
        positional = [i for i, a in enumerate(argv[1:], 1) if not a.startswith("-")][:1]
        return argv[:positional[0]] + [value] + argv[positional[0] + 1:]
    opts = [o for o in param.opts if o.startswith("--")]
    for i, a in enumerate(argv):
        if a in param.opts:
            return argv[:i] + [opts[0], value] + argv[i + 2:]
    return argv + [opts[0], value]


def _cases() -> list[tuple[str, str, str, list[str]]]:
    d = Path("{d}")
    cases = []
    for command in COMMANDS:
        cmd = cli.commands[command]
        for param in cmd.params:
            for value in _bad_values(param, d, command):
                cases.append((command, param.name, value, []))
        for extra in IGNORED.get(command, []):
            cases.append((command, "ignored", " ".join(extra), extra))
    return cases


CASES = _cases()


def _run_refused(argv: list[str], inputs, out: Path):
    res = CliRunner().invoke(cli, argv)
    text = res.output
    assert res.exit_code == 2, f"{argv}: exit {res.exit_code}\n{text}\n{res.exception!r}"
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(errors[0]) > len("error: ") + 10, text  # one paragraph that says something
    assert not any(out.iterdir()), f"{argv} left output: {list(out.iterdir())}"
    for path, digest in inputs["digests"].items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{argv} changed input {path}"
    return errors[0]


@pytest.mark.parametrize("command,option,value,extra", CASES,
                         ids=[f"{c}-{o}-{v!r}" for c, o, v, _ in CASES])
def test_bad_value_is_refused_cleanly(inputs, tmp_path, command, option, value, extra):
    d = inputs["dir"]
    out = tmp_path / "out"
    out.mkdir()
    argv = _baseline(command, d, out)
    if option == "ignored":
        argv = argv + [a.replace("{d}", str(d)) for a in extra]
    else:
        argv = _with(argv, _option(cli.commands[command], option), value.replace("{d}", str(d)))
    _run_refused(argv, inputs, out)


def test_the_generated_table_covers_every_option_of_every_command():
    covered = {(c, o) for c, o, _, _ in CASES}
    flags = {(c, p.name) for c in COMMANDS for p in cli.commands[c].params
             if isinstance(p, click.Option) and p.is_flag}
    every = {(c, p.name) for c in COMMANDS for p in cli.commands[c].params}
    missing = sorted(every - covered - flags)
    assert not missing, f"options without bad-value cases: {missing}"
    assert len(CASES) >= 300


# --------------------------------------------------------------------------- property-based: arbitrary text

QUICK = {  # command -> options that take text or numbers; these commands finish in about a second when valid
    "transform": ["input_shape", "kwargs", "entry", "ratio", "seed", "pipeline"],
    "prune": ["sparsity", "nm_pattern", "round_to"],
    "quantize": ["wbits", "abits"],
    "inspect": ["quant_bits"],
    "bench": ["batch_sizes", "iters"],
}
_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_numberish = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                       st.sampled_from(["", "1e309", "0x10", "1_0", " 3", "3 ", "-0", "2:4:", ":", ",", "{}"]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_arbitrary_values_succeed_or_are_refused_cleanly(inputs, tmp_path_factory, data):
    command = data.draw(st.sampled_from(sorted(QUICK)), label="command")
    name = data.draw(st.sampled_from(QUICK[command]), label="option")
    value = data.draw(st.one_of(_text, _numberish), label="value")
    assume(not value.startswith("-") or value.lstrip("-")[:1].isdigit())  # "--x" would be read as an option
    d = inputs["dir"]
    out = tmp_path_factory.mktemp("out")
    argv = _with(_baseline(command, d, out), _option(cli.commands[command], name), value)
    if command == "prune" and name == "nm_pattern":
        argv = [a for a in argv if a not in ("--sparsity", "0.5")] + ["--method", "nm"]
    if command == "prune" and name == "round_to":
        argv += ["--method", "structured"]
    if command == "quantize" and name == "abits":
        argv += ["--data", "digits"]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code in (0, 2), f"{argv}: exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    assert "Traceback" not in res.output
    if res.exit_code == 2:
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, res.output
        assert not any(out.iterdir())
    for path, digest in inputs["digests"].items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    shutil.rmtree(out, ignore_errors=True)


def test_an_unexpected_error_is_one_line_with_exit_1(monkeypatch):
    import sntfx.summary

    def broken(gm):
        raise RuntimeError("something\nsntfx did not expect")

    monkeypatch.setattr(sntfx.summary, "layer_summary", broken)
    res = CliRunner().invoke(cli, ["inspect", "sntfx:cnn"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "internal error: RuntimeError: something sntfx did not expect" in res.output and "-vv" in res.output
