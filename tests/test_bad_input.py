"""Bad-input sweep: every `dfq` subcommand, given a wrong value, exits 2 with one line on stderr that
names the value, and no traceback; a bad `generate` writes nothing.

Run in-process through `launch.cli.main` (fast), plus a few as real `python -m launch.cli`
subprocesses, where a traceback or another exit code could not hide behind pytest's capture.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.config import GenerateConfig
from engine.errors import EngineError
from launch.cli import main
from launch.cmd_bench import BENCHMARKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = ["generate", "--out", "{tmp}/pool", "--preset", "tiny"]
BN = ["generate", "--out", "{tmp}/pool", "--generator", "bn-distill", "--model", "cifar_resnet20"]
QUANT = ["quantize", "--model", "cifar_resnet20", "--calib", "noise", "--out", "{tmp}/q"]

# (argv, text the one-line message must contain); `{tmp}` is the test's tmp_path
CASES: list[tuple[list[str], str]] = [
    # generate: types and ranges (argparse)
    (["generate"], "--out"),
    ([*GEN, "--num-images", "-3"], "'-3'"),
    ([*GEN, "--num-images", "1.5"], "'1.5'"),
    ([*GEN, "--num-images", "1e9999"], "'1e9999'"),
    ([*GEN, "--shard-size", "0"], "--shard-size"),
    ([*GEN, "--k", "0"], "--k"),
    ([*GEN, "--steps", "zero"], "'zero'"),
    ([*GEN, "--batch-size", "0"], "--batch-size"),
    ([*GEN, "--workers", "-1"], "'-1'"),
    ([*GEN, "--seed", "-1"], "'-1'"),
    ([*GEN, "--guidance", "nan"], "'nan'"),
    ([*GEN, "--guidance", "inf"], "'inf'"),
    ([*GEN, "--guidance", "-0.5"], "'-0.5'"),
    ([*GEN, "--size", "33"], "'33'"),
    ([*GEN, "--size", "64x"], "'64x'"),
    ([*GEN, "--max-retries", "-1"], "'-1'"),
    ([*GEN, "--preset", "huge"], "'huge'"),
    ([*GEN, "--pairing", "weird"], "'weird'"),
    ([*GEN, "--image-format", "gif"], "'gif'"),
    ([*GEN, "--device", "tpu"], "'tpu'"),
    ([*GEN, "--generator", "gan"], "'gan'"),
    ([*GEN, "--frobnicate"], "--frobnicate"),
    # generate: values argparse accepts but the config refuses
    ([*GEN, "--seed", str(2**63)], str(2**63)),
    ([*GEN, "--quality", "101"], "101"),
    ([*GEN, "--vocab", "cifar10", "--k", "11"], "k=11"),
    ([*GEN, "--vocab", "{tmp}/two.txt", "--k", "3"], "k=3"),
    ([*GEN, "--vocab", "{tmp}/missing.txt"], "{tmp}/missing.txt"),
    ([*GEN, "--vocab", "{tmp}/empty.txt"], "{tmp}/empty.txt"),
    ([*GEN, "--vocab", "{tmp}"], "{tmp}"),
    ([*GEN, "--vocab", "cifar11"], "cifar11"),
    ([*GEN, "--scheduler", "nosuch"], "'nosuch'"),
    ([*GEN, "--scheduler", "DiffusionPipeline"], "'DiffusionPipeline'"),
    ([*GEN, "--template", "no slot"], "'no slot'"),
    ([*GEN, "--template", "{} and {}"], "'{} and {}'"),
    ([*GEN, "--prefix", "a.b"], "'a.b'"),
    ([*GEN, "--prefix", ""], "''"),
    ([*GEN, "--model", "{tmp}/no-model"], "{tmp}/no-model"),
    ([*GEN, "--model", ""], "model"),
    (["generate", "--out", "", "--preset", "tiny"], "out"),
    (["generate", "--out", "{tmp}/two.txt", "--preset", "tiny"], "{tmp}/two.txt"),
    (["generate", "--out", "{tmp}/two.txt/pool", "--preset", "tiny"], "{tmp}/two.txt/pool"),
    # generate: generator options (from the generators' settings)
    ([*GEN, "--distill-lr", "0.1"], "--distill-lr"),
    ([*BN, "--guidance", "2"], "--guidance"),
    ([*BN, "--iterations", "2", "--steps", "3"], "--iterations and --steps"),
    ([*BN, "--distill-lr", "0"], "'0'"),
    ([*BN, "--distill-method", "magic"], "'magic'"),
    ([*BN, "--preset", "tiny"], "'tiny'"),
    ([*BN, "--pairing", "balanced"], "'balanced'"),
    ([*BN, "--batch-size", "auto"], "'auto'"),
    # quantize
    (["quantize"], "--model"),
    ([*QUANT, "--wbits", "1"], "got 1"),
    ([*QUANT, "--wbits", "9"], "got 9"),
    ([*QUANT, "--abits", "x"], "'x'"),
    ([*QUANT, "--first-last-bits", "0"], "got 0"),
    ([*QUANT, "--method", "magic"], "'magic'"),
    ([*QUANT, "--augment-cutmix", "1"], "'1'"),
    ([*QUANT, "--augment-cutmix", "0.5"], "--augment-cutmix 0.5"),  # without --augment N > 1
    ([*QUANT, "--augment-mixup", "-1"], "'-1'"),
    ([*QUANT, "--augment-mixup", "0.4"], "--augment-mixup 0.4"),  # without --augment N > 1
    ([*QUANT, "--n-calib", "0"], "--n-calib"),
    ([*QUANT, "--iters", "-1"], "-1"),
    ([*QUANT, "--batch-size", "two"], "'two'"),
    ([*QUANT, "--verify", "md5"], "'md5'"),
    ([*QUANT[:2], "no_such_model_xyz", *QUANT[3:]], "no_such_model_xyz"),
    ([*QUANT[:2], "timm:no_such_net", *QUANT[3:]], "timm:no_such_net"),
    ([*QUANT[:2], "tv:no_such_net", *QUANT[3:]], "tv:no_such_net"),
    ([*QUANT[:2], "no_such_pkg:factory", *QUANT[3:]], "no_such_pkg:factory"),
    ([*QUANT, "--num-classes", "7"], "7"),
    ([*QUANT, "--checkpoint", "{tmp}/missing.pt"], "{tmp}/missing.pt"),
    ([*QUANT, "--checkpoint", "{tmp}/two.txt"], "{tmp}/two.txt"),
    ([*QUANT[:4], "{tmp}/missing-pool", *QUANT[5:]], "{tmp}/missing-pool"),
    ([*QUANT[:4], "{tmp}/two.txt", *QUANT[5:]], "{tmp}/two.txt"),
    ([*QUANT, "--eval", "{tmp}/missing-eval"], "{tmp}/missing-eval"),
    ([*QUANT[:6], "{tmp}/two.txt/q"], "{tmp}/two.txt/q"),
    # inspect
    (["inspect"], "pool"),
    (["inspect", "{tmp}/missing-pool"], "{tmp}/missing-pool"),
    (["inspect", "{tmp}"], "{tmp}"),
    (["inspect", "{tmp}", "--num", "-1"], "'-1'"),
    (["inspect", "{tmp}", "--columns", "0"], "'0'"),
    # bench, and the top level
    (["bench"], "accuracy"),
    (["bench", "no-such-bench"], "'no-such-bench'"),
    *[(["bench", name, "--no-such-option"], "--no-such-option") for name in BENCHMARKS],
    ([], "required"),
    (["frobnicate"], "'frobnicate'"),
]


@pytest.fixture
def files(tmp_path) -> str:
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    return str(tmp_path)


def _fill(args: list[str], tmp: str) -> list[str]:
    return [a.replace("{tmp}", tmp) for a in args]


@pytest.mark.parametrize(("argv", "needle"), CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_input_exits_2_with_one_line_naming_it(files: str, capsys, argv, needle: str) -> None:
    before = sorted(os.listdir(files))
    assert main(_fill(argv, files)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("dfq") and "Traceback" not in err
    assert _fill([needle], files)[0] in err, err
    if argv[:1] in (["generate"], ["quantize"]):  # a refused run writes nothing, not even its --out
        assert sorted(os.listdir(files)) == before


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([*GEN, "--guidance", "inf"], "'inf'"),  # was a ValueError traceback from the manifest's JSON
        ([*QUANT, "--wbits", "9"], "got 9"),
        (["inspect", "{tmp}/missing-pool"], "{tmp}/missing-pool"),
    ],
)
def test_bad_input_as_a_real_process(files: str, argv, needle: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", *_fill(argv, files)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert _fill([needle], files)[0] in err


@pytest.mark.parametrize("guidance", [float("inf"), float("-inf"), float("nan"), -1.0, True])
def test_config_refuses_non_finite_guidance(tmp_path, guidance) -> None:
    """The Python API gets the same one-line refusal as the CLI, before anything is written."""
    cfg = GenerateConfig(out=str(tmp_path / "pool"), preset="tiny", settings={"guidance": guidance})
    with pytest.raises(EngineError, match="guidance must be a finite number >= 0"):
        cfg.resolved()
    assert not (tmp_path / "pool").exists()
