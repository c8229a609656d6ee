"""Fuzzing the `scldm` argument surface: any command line either succeeds or prints one `error: ...` line, exit 2.

Hypothesis draws, per subcommand, lists of its real option names with garbage values (empty, negative, huge, NaN,
non-numbers, odd paths), unknown options, missing or malformed input files and unwritable outputs, and runs
`scldm_hf.cli.main(argv)` in-process. No input is ever valid enough to start work (training always gets a `--data`
that does not exist, generation no loadable model), so the test covers parsing and validation, not training.
`push-corpus` and the Hub/tracker options of `train` are left out: they would reach the network.
"""

import contextlib
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scldm_hf.cli import build_parser, main
from scldm_hf.training import STAGES, RecipeParser

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"

GARBAGE_VALUES = ["", " ", "0", "-1", "-0.5", "1e30", "-1e30", "nan", "inf", "abc", "true", "none", "x=y", "=",
                  "a=b=c", "1,2", "[1, 2]", "{}", "ü🧬", "-", "5", "0.5", "2"]
ODD_PATHS = ["missing.h5ad", "empty.h5ad", "text.h5ad", "bad.yaml", "list.yaml", "bad.csv", "folder", "pipe",
             "org/repo", "./nowhere/pipe", "/dev/null/x", "a" * 300]
UNKNOWN_OPTIONS = ["--frobnicate", "-x", "--num_cells", "--model.hiden_size", "--out=", "---", "--data.x", "-"]
# Commands and options that would reach the network (Hub pushes, remote trackers) are never drawn.
NETWORK_OPTIONS = ("hub", "push", "report_to")
NETWORK_COMMANDS = ("push-corpus",)


def option_names(parser) -> list[str]:
    return sorted(option for action in parser._actions for option in action.option_strings
                  if option not in ("-h", "--help") and not any(word in option for word in NETWORK_OPTIONS))


SUBCOMMANDS = next(action for action in build_parser()._actions if action.dest == "command").choices
COMMAND_OPTIONS = {name: option_names(parser) for name, parser in SUBCOMMANDS.items()
                   if name not in ("train", *NETWORK_COMMANDS)}
STAGE_OPTIONS = {stage: option_names(RecipeParser(config_class, stage)) for stage, (config_class, _) in STAGES.items()}
POSITIONALS = {name: sum(not action.option_strings for action in SUBCOMMANDS[name]._actions) for name in COMMAND_OPTIONS}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder of malformed inputs: empty and text .h5ad, broken YAML, a CSV that is not UTF-8, an empty folder."""
    folder = tmp_path_factory.mktemp("fuzz_cli")
    (folder / "empty.h5ad").write_bytes(b"")
    (folder / "text.h5ad").write_text("not an AnnData")
    (folder / "bad.yaml").write_text("vae: [1, 2\nmodel: : :\n")
    (folder / "list.yaml").write_text("- 1\n- 2\n")
    (folder / "bad.csv").write_bytes(b"\xff\xfe\x00\n")
    (folder / "folder").mkdir()
    return folder


def run_cli(argv: list[str], folder: Path, monkeypatch) -> None:
    """`scldm argv` in `folder` must exit 0, or exit 2 with one `error: ...` line (the last line) and no traceback."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with monkeypatch.context() as patch, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        patch.chdir(folder)
        code = main(argv)
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error: ")]
    assert "Traceback" not in stderr.getvalue(), (argv, stderr.getvalue())
    assert code == 0 or (code == 2 and len(errors) == 1 and stderr.getvalue().endswith(errors[0] + "\n")), (
        argv, code, stderr.getvalue())


@st.composite
def option_arguments(draw, options: list[str]) -> list[str]:
    """Up to 6 options, each a real option name or an unknown one, with 0 to 2 garbage values or odd paths."""
    argv = []
    for _ in range(draw(st.integers(0, 6))):
        argv.append(draw(st.sampled_from(options) | st.sampled_from(UNKNOWN_OPTIONS)))
        count = draw(st.just(1) | st.integers(0, 2))
        argv += draw(st.lists(st.sampled_from(GARBAGE_VALUES) | st.sampled_from(ODD_PATHS), min_size=count,
                              max_size=count))
    return argv


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(st.sampled_from(sorted(COMMAND_OPTIONS)))
    count = draw(st.just(POSITIONALS[command]) | st.integers(0, POSITIONALS[command] + 1))
    positionals = draw(st.lists(st.sampled_from(ODD_PATHS), min_size=count, max_size=count))
    return [command, *positionals, *draw(option_arguments(COMMAND_OPTIONS[command]))]


@st.composite
def train_command_lines(draw) -> list[str]:
    stage = draw(st.sampled_from(sorted(STAGE_OPTIONS)))
    config = draw(st.sampled_from([[], ["--config", str(TINY)], ["--config", "bad.yaml"], ["--config", "list.yaml"],
                                   ["--config", "missing.yaml"]]))
    return ["train", stage, *config, *draw(option_arguments(STAGE_OPTIONS[stage])), "--data", "missing.h5ad"]


FUZZ_SETTINGS = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(FUZZ_SETTINGS, max_examples=150)
@given(argv=command_lines())
def test_convert_generate_evaluate_command_lines(workdir, monkeypatch, argv):
    run_cli(argv, workdir, monkeypatch)


@settings(FUZZ_SETTINGS, max_examples=30)
@given(argv=train_command_lines())
def test_train_command_lines(workdir, monkeypatch, argv):
    run_cli(argv, workdir, monkeypatch)


@settings(FUZZ_SETTINGS, max_examples=20)
@given(argv=st.lists(st.sampled_from(UNKNOWN_OPTIONS + GARBAGE_VALUES + sorted(COMMAND_OPTIONS)), max_size=4))
def test_top_level_command_lines(workdir, monkeypatch, argv):
    run_cli(argv, workdir, monkeypatch)
