"""The cluster launch files in `launch/configs/` parse and hold what their tools need.

No cluster is started: the Ray cluster launcher YAML and the KubeRay RayJob are checked for the
keys `ray up` and the KubeRay operator require, the SLURM script with `bash -n`; all three must
run `dfq generate --address ...` so the engine joins the cluster they start.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from launch.cli import build_parser

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"


def load(name: str) -> dict:
    with open(CONFIGS / name) as f:
        return yaml.safe_load(f)


def _dfq_generate_args(command: str) -> list[str]:
    """The arguments after `dfq` in a shell command line."""
    words = shlex.split(command, comments=True)
    start = words.index("dfq")
    return words[start + 1 :]


def _parses(argv: list[str]) -> None:
    """The real CLI parser accepts the command (parse only, run nothing)."""
    args = build_parser().parse_args(argv)
    assert args.command == "generate" and args.address and args.out


def test_ray_cluster_launcher_yaml() -> None:
    cfg = load("ray-cluster.yaml")
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type"):
        assert key in cfg, key
    assert cfg["provider"]["type"] and cfg["head_node_type"] in cfg["available_node_types"]
    workers = {
        name: node
        for name, node in cfg["available_node_types"].items()
        if name != cfg["head_node_type"] and node.get("resources", {}).get("GPU", 0) >= 1
    }
    assert workers, "no worker node type with GPU resources"
    assert all(node["max_workers"] <= cfg["max_workers"] for node in workers.values())
    assert cfg["available_node_types"][cfg["head_node_type"]].get("resources", {}).get("GPU", 0) == 0
    assert any("pip install" in c and "dfq" in c for c in cfg["setup_commands"])
    text = (CONFIGS / "ray-cluster.yaml").read_text()
    assert "ray up" in text and "dfq generate --address auto" in text


def test_kuberay_rayjob_manifest() -> None:
    job = load("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["name"]
    entrypoint = job["spec"]["entrypoint"]
    assert entrypoint.startswith("dfq generate --address ")
    _parses(_dfq_generate_args(entrypoint))
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and "nvidia.com/gpu" not in head["resources"].get("limits", {})  # driver: no GPU
    groups = cluster["workerGroupSpecs"]
    assert groups and all(g["groupName"] and g["replicas"] >= 1 for g in groups)
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] and int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_slurm_sbatch_script() -> None:
    path = CONFIGS / "slurm-ray.sbatch"
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    text = path.read_text()
    assert text.startswith("#!/bin/bash") and "#SBATCH --nodes=" in text
    for needle in ("ray start --head", "ray start --address", "dfq generate --address auto"):
        assert needle in text, needle
    line = next(x for x in text.splitlines() if x.startswith("dfq generate")).split("||")[0]
    _parses(_dfq_generate_args(line.replace('"$out" "$@"', "/shared/pool --num-images 64")))


def test_documented_commands_parse() -> None:
    """The `dfq generate` lines quoted in the files' comments are commands the CLI accepts."""
    for name in ("ray-cluster.yaml", "kuberay-rayjob.yaml"):
        text = (CONFIGS / name).read_text()
        lines = [x.lstrip("# ").rstrip() for x in text.splitlines()]
        for i, line in enumerate(lines):
            if line.startswith("ray job submit"):
                command = line.removesuffix("\\") + " " + lines[i + 1] if line.endswith("\\") else line
                _parses(_dfq_generate_args(command))
