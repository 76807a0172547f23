"""Pool diagnostics (`quant.diagnostics`, `dfq inspect POOL --model M`): the feature statistics are
right on sets whose answer is known, a pool ranks nearer to itself than to noise, and the report
files are complete."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.cli import main
from quant.data import build_transform, load_calibration
from quant.diagnostics import DiagnosticsSettings, classifier_layer, diagnose, penultimate_features
from quant.feature_stats import class_similarity, frechet_distance, mean_pairwise_cosine
from tests.test_end_to_end import tiny_bn_cnn

MODEL = "tests.test_end_to_end:tiny_bn_cnn"
FAST = DiagnosticsSettings(embed=0, thumbnails=4, matrix=16)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_pool(root: Path, images: np.ndarray, class_ids: list[list[int]]) -> Path:
    """A one-shard format-1 pool (SHARDS.md) of uint8 HxWx3 `images` with these prompted classes."""
    root.mkdir(parents=True)
    with tarfile.open(root / "shard-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (image, ids) in enumerate(zip(images, class_ids)):
            key = f"s{i:09d}"
            meta = {"format_version": 1, "index": i, "key": key, "class_ids": ids, "k": len(ids)}
            _add(tar, f"{key}.png", _png(image))
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            _add(tar, f"{key}.cls", str(ids[0]).encode())
    data = (root / "shard-000000.tar").read_bytes()
    entry = {"url": "shard-000000.tar", "nsamples": len(images), "filesize": len(data)}
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    manifest = {"format": "dfq-shards", "format_version": 1, "num_samples": len(images), "shardlist": [entry]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def smooth_images(n: int, seed: int) -> np.ndarray:
    """Natural-ish images: a coarse random colour field upsampled, per image."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    return (fine.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def noise_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model_and_config():
    return tiny_bn_cnn()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A 40-image pool prompted with two classes each, the same images as an .npz, and noise."""
    root = tmp_path_factory.mktemp("diag")
    images = smooth_images(40, seed=1)
    ids = [[i % 10, (i * 3 + 1) % 10] for i in range(40)]
    pool = write_pool(root / "pool", images, ids)
    same = root / "same.npz"
    np.savez(same, images=images, labels=np.array([i[0] for i in ids]))
    noise = root / "noise.npz"
    np.savez(noise, images=noise_images(40, seed=2), labels=np.arange(40) % 10)
    twins = write_pool(root / "twins", np.repeat(images[:1], 12, axis=0), [[3]] * 12)
    return {"pool": pool, "same": same, "noise": noise, "twins": twins}


def test_frechet_distance_zero_to_itself_exact_for_a_shift_large_to_noise() -> None:
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(8, 8))
    a = rng.normal(size=(300, 8)) @ mix + 5.0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8 * np.trace(np.cov(a, rowvar=False)))
    # same covariance, mean moved by 2 in every dimension: exactly |shift|^2
    assert frechet_distance(a, a + 2.0) == pytest.approx(4.0 * 8, rel=1e-8)
    # the scipy formula (sqrtm of the product) on well-conditioned sets
    from scipy import linalg

    b = rng.normal(size=(300, 8)) * 2.0
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a, b) > 100 * frechet_distance(a, a[::-1].copy()) + 1.0
    # fewer samples than dimensions (singular covariances): finite and non-negative
    few = frechet_distance(rng.normal(size=(3, 50)), rng.normal(size=(4, 50)))
    assert np.isfinite(few) and few >= 0
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b)


def test_cosine_diversity_is_one_for_identical_and_zero_for_orthogonal() -> None:
    same = np.tile(np.array([[0.3, 1.0, 2.0]]), (5, 1))
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    assert mean_pairwise_cosine(np.eye(4)) == pytest.approx(0.0)
    assert mean_pairwise_cosine(same[:1]) is None
    stats = class_similarity(np.concatenate([same, np.eye(3)]), np.array([0] * 5 + [1] * 3))
    assert stats["per_class"] == {0: pytest.approx(1.0), 1: pytest.approx(0.0)}
    assert stats["mean_per_class"] == pytest.approx(0.5)
    assert 0.0 < stats["overall"] < 1.0


def test_penultimate_features_are_the_classifier_input(model_and_config) -> None:
    model, _ = model_and_config
    x = torch.randn(6, 3, 32, 32)
    feats, logits = penultimate_features(model, [x[:4], x[4:]])
    head = classifier_layer(model)
    assert head is model[-1] and feats.shape == (6, head.in_features)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x))
        torch.testing.assert_close(head(torch.from_numpy(feats)), model(x))


def test_pool_is_nearer_itself_than_noise_and_the_statistics_hold(model_and_config, data) -> None:
    model, cfg = model_and_config
    itself = diagnose(model, cfg, str(data["pool"]), reference=str(data["same"]), settings=FAST)
    to_noise = diagnose(model, cfg, str(data["pool"]), reference=str(data["noise"]), settings=FAST)
    to_gauss = diagnose(model, cfg, str(data["pool"]), reference="noise", settings=FAST)
    assert itself["frechet"]["overall"] == pytest.approx(0.0, abs=1e-6)
    assert to_noise["frechet"]["overall"] > 10 * (itself["frechet"]["overall"] + 1e-3)
    assert to_gauss["frechet"]["overall"] > 10 * (itself["frechet"]["overall"] + 1e-3)
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in itself["frechet"]["per_class"].values())
    assert set(itself["frechet"]["per_class"]) == set(range(10))  # 4 images a class in both

    pool = itself["pool"]
    assert pool["n"] == 40 and pool["label_source"] == "records"
    assert (
        itself["reference"]["label_source"] == "labels"
        and to_gauss["reference"]["label_source"] == "predicted"
    )
    # fidelity and histogram from the model's own predictions, computed here independently
    images = load_calibration(str(data["pool"]), build_transform(cfg), 40)
    with torch.no_grad():
        logits = model(images)
    top5 = logits.topk(5, dim=1).indices.tolist()
    prompted = [{i % 10, (i * 3 + 1) % 10} for i in range(40)]
    expected = np.mean([bool(set(t) & p) for t, p in zip(top5, prompted)])
    assert pool["fidelity"]["top_k"] == pytest.approx(expected) and pool["fidelity"]["k"] == 5
    assert pool["fidelity"]["top1"] == pytest.approx(np.mean([t[0] in p for t, p in zip(top5, prompted)]))
    histogram = np.bincount(logits.argmax(1).numpy(), minlength=10).tolist()
    assert pool["prediction_histogram"] == histogram
    assert pool["coverage"]["predicted_classes"] == sum(c > 0 for c in histogram)
    assert pool["label_histogram"] == [4] * 10
    assert 0.0 < pool["diversity"]["overall"] < 1.0


def test_identical_images_have_diversity_one(model_and_config, data) -> None:
    model, cfg = model_and_config
    report = diagnose(model, cfg, str(data["twins"]), settings=FAST)
    assert report["pool"]["diversity"]["overall"] == pytest.approx(1.0, abs=1e-6)
    assert report["pool"]["diversity"]["per_class"] == {3: pytest.approx(1.0, abs=1e-6)}
    assert report["frechet"] is None and report["reference"] is None


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_cli_writes_a_self_contained_report(data, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    argv = ["inspect", str(data["pool"]), "--model", MODEL, "--reference", str(data["noise"])]
    assert main([*argv, "--report", str(out), "--embed", "30"]) == 0
    captured = capsys.readouterr()
    stages = re.findall(r"^dfq inspect: \[(\d)/(\d)\]", captured.err, flags=re.M)
    assert [int(k) for k, _ in stages] == list(range(1, 7)) and {t for _, t in stages} == {"6"}
    assert "Fréchet distance to the reference" in captured.out and str(out / "index.html") in captured.out

    page = (out / "index.html").read_text()
    pngs = _embedded_pngs(page)
    assert len(pngs) == 5 and all(p.startswith(b"\x89PNG") for p in pngs)
    assert "<img" in page and "src='http" not in page and 'src="' not in page  # nothing fetched
    report = json.loads((out / "report.json").read_text())
    for key in ("format", "model", "num_classes", "feature_dim", "pool", "reference", "frechet", "embedding"):
        assert key in report
    for key in ("diversity", "fidelity", "coverage", "prediction_histogram", "n", "source"):
        assert key in report["pool"] and key in report["reference"]
    assert report["files"] == {"html": str(out / "index.html"), "json": str(out / "report.json")}
    emb = report["embedding"]["sets"]
    assert len(emb["pool"]["xy"]) == 30 and len(emb["reference"]["xy"]) == 30
    assert all(len(p) == 2 and all(np.isfinite(p)) for p in emb["pool"]["xy"])

    # default report directory of a local pool: <pool>/report; no embedding with --embed 0
    assert main(["inspect", str(data["pool"]), "--model", MODEL, "--embed", "0", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["embedding"] is None and printed["files"]["html"] == str(
        data["pool"] / "report" / "index.html"
    )
    assert len(_embedded_pngs((data["pool"] / "report" / "index.html").read_text())) == 4


def test_also_ranks_several_sets_against_one_reference(data, tmp_path, capsys) -> None:
    """`--also NAME=SOURCE`: each set gets its summary and its distance to the same reference; a set
    equal to the reference is ~0 from it, noise far; one report shows them all."""
    out = tmp_path / "several"
    argv = ["inspect", str(data["pool"]), "--model", MODEL, "--reference", str(data["same"]), "--json"]
    also = ["--also", f"twin={data['same']}", "--also", f"noisy={data['noise']}", "--also", "gauss=noise"]
    assert main([*argv, *also, "--report", str(out), "--embed", "20"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sets"] == ["pool", "twin", "noisy", "gauss", "reference"]
    fd = report["frechet_of"]
    assert set(fd) == {"pool", "twin", "noisy", "gauss"} and report["frechet"] == fd["pool"]
    assert fd["twin"]["overall"] == pytest.approx(0.0, abs=1e-6)
    assert min(fd["noisy"]["overall"], fd["gauss"]["overall"]) > 10 * (fd["twin"]["overall"] + 1e-3)
    assert report["twin"]["n"] == report["reference"]["n"] and "diversity" in report["gauss"]
    assert set(report["embedding"]["sets"]) == set(report["sets"])
    page = (out / "index.html").read_text()
    assert "noisy: <b>" in page and len(_embedded_pngs(page)) == 5
    for bad, needle in ((["--also", "pool=noise"], "'pool'"), (["--also", "noise"], "NAME=SOURCE")):
        assert main([*argv, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err


def test_cli_bad_input_is_one_line(data, tmp_path, capsys) -> None:
    cases = [
        (["inspect", str(data["pool"]), "--reference", str(data["noise"])], "--reference needs --model"),
        (
            ["inspect", str(data["pool"]), "--model", MODEL, "--reference", str(tmp_path / "nope")],
            "--reference",
        ),
        (["inspect", str(tmp_path / "nothing"), "--model", MODEL], "does not exist"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and err.startswith("dfq inspect")
