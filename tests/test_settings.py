"""Generators as plug-ins: the registry, typed settings, the config hash, and the CLI built from them.

A toy generator (`echo`, tests/echo_generator.py: a settings dataclass, a factory; one registry entry) shows
that a new generator needs nothing else: its option reaches `dfq generate`, its setting is hashed,
and a worker writes its shard with the shared per-sample record.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from engine.config import GenerateConfig
from engine.errors import EngineError
from engine.generators import GENERATORS, GeneratorSpec, generator_names, settings_class
from launch.cli import main
from tests.echo_generator import EchoSettings

#: For each generator, another valid value of every content setting (a new setting needs a line here).
OTHER_VALUES = {
    "diffusion": {
        "template": "art of {}", "steps": 5, "guidance": 2.0, "size": (16, 16), "negative_prompt": "blurry",
        "scheduler": "DDIMScheduler", "max_retries": 1,
    },
    "bn-distill": {
        "iterations": 3, "method": "pixels", "lr": 0.05, "bn_loss": "norm", "ce_weight": 0.0, "swing": False,
        "batch_size": 2, "marginal": "gauss",
    },
}  # fmt: skip
BASE = {"diffusion": {"preset": "tiny"}, "bn-distill": {"model": "module:classifier", "vocab": "cifar10"}}


@pytest.fixture
def echo(monkeypatch):
    monkeypatch.setitem(
        GENERATORS,
        "echo",
        GeneratorSpec("tests.echo_generator:EchoGenerator", "tests.echo_generator:EchoSettings"),
    )


def test_the_registry_and_settings_classes_import_no_torch() -> None:
    code = (
        "import sys\nfrom engine.generators import generator_names, settings_class\n"
        "[settings_class(n).options() for n in generator_names()]\nprint('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.parametrize("generator", ["diffusion", "bn-distill"])
def test_every_content_setting_enters_the_hash(generator: str, tmp_path) -> None:
    cls = settings_class(generator)
    content = [f.name for f in dataclasses.fields(cls) if f.metadata.get("content", True)]
    assert sorted(OTHER_VALUES[generator]) == sorted(content)
    base = GenerateConfig(out=str(tmp_path), generator=generator, **BASE[generator]).resolved()
    added = [f.name for f in dataclasses.fields(cls) if f.metadata.get("added")]  # out at their default
    assert sorted(base.content_config()["settings"]) == sorted(set(content) - set(added))
    for name, value in OTHER_VALUES[generator].items():
        other = GenerateConfig(
            out=str(tmp_path), generator=generator, settings={name: value}, **BASE[generator]
        ).resolved()
        assert other.config_hash() != base.config_hash(), name


def test_runtime_fields_stay_out_of_the_diffusion_hash(tmp_path) -> None:
    a = GenerateConfig(out=str(tmp_path), preset="tiny", batch_size=8).resolved()
    b = GenerateConfig(
        out=str(tmp_path / "b"), preset="tiny", batch_size=2, workers=4, compile=True
    ).resolved()
    assert a.config_hash() == b.config_hash()


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"settings": {"stepz": 2}}, "unknown diffusion setting 'stepz'"),
        ({"generator": "bn-distill", "model": "m", "preset": "tiny"}, "unknown preset 'tiny' for generator"),
        ({"checkpoint": "w.pt"}, "checkpoint is for classifier-based generators"),
        ({"settings": {"steps": 0}}, "steps must be an integer >= 1, got 0"),
        ({"settings": {"size": (16,)}}, "size must be (width, height)"),
    ],
)
def test_bad_settings_are_refused_in_one_line(kw: dict, needle: str, tmp_path) -> None:
    with pytest.raises(EngineError) as info:
        GenerateConfig(out=str(tmp_path), **{"preset": "tiny", **kw}).resolved()
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_settings_of_another_generator_are_refused(tmp_path) -> None:
    bn = settings_class("bn-distill")()
    with pytest.raises(EngineError, match="takes DiffusionSettings, got BNDistillSettings"):
        GenerateConfig(out=str(tmp_path), settings=bn).resolved()


def test_a_new_generator_is_one_registry_entry(echo, tmp_path, capsys) -> None:
    """Its option appears in `dfq generate`, reaches its settings, is hashed, and a worker writes its
    shard; its flag is refused for another generator."""
    from launch.cli import build_parser
    from launch.cmd_generate import config_from_args

    assert "echo" in generator_names()
    out = str(tmp_path / "pool")
    args = build_parser().parse_args(["generate", "--out", out, "--generator", "echo", "--shade", "7"])
    cfg = config_from_args(args).resolved()
    assert cfg.settings == EchoSettings(shade=7) and cfg.content_config()["settings"] == {"shade": 7}

    from engine.worker import ShardWorker

    (tmp_path / "pool").mkdir()
    cfg = dataclasses.replace(cfg, num_images=3, shard_size=3)
    result = ShardWorker(cfg).run_unit(0)
    assert result["nsamples"] == 3

    assert main(["generate", "--out", out, "--preset", "tiny", "--shade", "7"]) == 2
    assert "--shade is not an option of --generator diffusion" in capsys.readouterr().err


def test_shared_flags_and_aliases(capsys, tmp_path) -> None:
    """`--steps` is diffusion's steps and bn-distill's old name for `--iterations`; both at once is refused."""
    from launch.cli import build_parser
    from launch.cmd_generate import settings_from_args

    parse = build_parser().parse_args
    base = ["generate", "--out", str(tmp_path)]
    assert settings_from_args(parse([*base, "--steps", "3"])) == {"steps": 3}
    assert settings_from_args(parse([*base, "--generator", "bn-distill", "--steps", "3"])) == {
        "iterations": 3
    }
    assert settings_from_args(parse([*base, "--generator", "bn-distill", "--no-distill-swing"])) == {
        "swing": False
    }
    argv = [
        *base,
        "--generator",
        "bn-distill",
        "--model",
        "cifar_resnet20",
        "--iterations",
        "2",
        "--steps",
        "3",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dfq generate: error: --iterations and --steps both set iterations: give one"


def test_help_lists_each_generators_options(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--steps",
        "--guidance",
        "--size",
        "--iterations",
        "--distill-method",
        "--distill-ce-weight",
    ):
        assert flag in text
    assert "diffusion options" in text and "bn-distill options" in text
