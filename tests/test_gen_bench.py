"""Generation throughput: the benchmarks run on a CPU in their tiny form and write well-formed reports
(`gen_throughput.FIELDS`, the scaling rows' fields); the fast worker path keeps the shard bytes of the
plain one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import gen_scaling, gen_throughput
from engine.config import GenerateConfig
from engine.diffusion import DiffusionGenerator, _to_pil, is_usable, to_uint8, usable_mask
from engine.pipeline import sample_images
from engine.worker import ShardWorker
from engine.writer import file_sha256

GEN_FIELDS = set(gen_throughput.FIELDS)
ROW_FIELDS = {"actors", "img_per_s", "efficiency", "driver_cpu_ms_per_image"}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One thread, as in a CPU actor: two OpenMP threads spin against each other on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(out, **kw) -> GenerateConfig:
    return GenerateConfig(
        out=str(out),
        **{"preset": "tiny", "num_images": 6, "shard_size": 6, "batch_size": 2, "progress": False, **kw},
    ).resolved()


class _PlainCallGenerator(DiffusionGenerator):
    """The plain path: the diffusers pipeline call itself, one per batch."""

    def denoise(self, prompts, seeds, steps=None):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.inference_mode():
            return self.pipe(
                prompt=prompts, num_inference_steps=self.settings.steps, guidance_scale=self.settings.guidance,
                height=self.settings.height, width=self.settings.width, generator=generators, output_type="np",
            ).images  # fmt: skip


def test_fast_paths_keep_the_shard_bytes(tiny_pipeline, tmp_path) -> None:
    """Our sync-free denoising loop, the batch-wise NaN check and uint8 conversion, and the background
    writer thread (one encoder, or a pool of three) give byte-identical shards to the diffusers call
    with serial encoding."""
    hashes = {}
    for name, gen_cls, overlap, encoders in (
        ("reference", _PlainCallGenerator, False, 1),
        ("serial", DiffusionGenerator, False, 1),
        ("overlap", DiffusionGenerator, True, 1),
        ("overlap-pool", DiffusionGenerator, True, 3),
    ):
        cfg = tiny_cfg(tmp_path / name)
        (tmp_path / name).mkdir()
        worker = ShardWorker(cfg, generator=gen_cls(cfg, pipe=tiny_pipeline), overlap=overlap)
        worker.encoders = encoders
        result = worker.run_unit(0)
        hashes[name] = file_sha256(str(tmp_path / name / result["url"]))
        assert result["nsamples"] == 6 and result["sha256"] == hashes[name]
    assert hashes["serial"] == hashes["reference"]
    assert hashes["overlap"] == hashes["reference"]
    assert hashes["overlap-pool"] == hashes["reference"]


def test_sample_images_matches_the_pipeline_call_with_negative_prompt_and_no_cfg(tiny_pipeline) -> None:
    prompts = ["a photo of tench", "a photo of goldfish and shark"]
    for negative, guidance in ((["blurry"] * 2, 3.5), (None, 1.0)):
        ref_gen = [torch.Generator().manual_seed(s) for s in (4, 5)]
        got_gen = [torch.Generator().manual_seed(s) for s in (4, 5)]
        with torch.inference_mode():
            ref = tiny_pipeline(
                prompt=prompts, negative_prompt=negative, num_inference_steps=3, guidance_scale=guidance,
                height=32, width=32, generator=ref_gen, output_type="np",
            ).images  # fmt: skip
        got = sample_images(
            tiny_pipeline,
            prompts,
            got_gen,
            steps=3,
            guidance=guidance,
            height=32,
            width=32,
            negative_prompt=negative,
        )
        assert np.array_equal(ref, got)


def test_batch_checks_match_the_per_image_ones() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((4, 8, 8, 3), dtype=np.float32)
    images[1, 0, 0, 0] = np.nan
    images[2] = 0.25
    images[3, 0, 0, 0] = 0.5 + 0.5 / 255  # a half-way value: both round half to even
    assert usable_mask(images) == [is_usable(i) for i in images] == [True, False, False, True]
    pixels = to_uint8(images)
    for i in (0, 3):
        assert np.array_equal(np.asarray(_to_pil(images[i])), pixels[i])


def test_padded_batches_return_only_the_real_samples(tiny_pipeline, tmp_path) -> None:
    """Compiled generators pad a short batch to the compiled shape; the extra outputs are dropped."""
    cfg = tiny_cfg(tmp_path, batch_size=4)
    gen = DiffusionGenerator(cfg, pipe=tiny_pipeline)
    plain = gen.denoise(["a photo of x", "a photo of y"], [1, 2])
    gen.pad_batches = True
    padded = gen.denoise(["a photo of x", "a photo of y"], [1, 2])
    assert padded.shape == plain.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(padded, plain, atol=1e-4)  # batch size may change the last bits


def test_a_writer_thread_error_fails_the_shard_and_leaves_no_file(tiny_pipeline, tmp_path) -> None:
    class Broken(DiffusionGenerator):
        def generate(self, indices):
            return [("not an image", self.record(self.sampler.sample(i), 0, 0)) for i in indices]

    cfg = tiny_cfg(tmp_path)
    with pytest.raises(AttributeError):
        ShardWorker(cfg, generator=Broken(cfg, pipe=tiny_pipeline)).run_unit(0)
    assert list(tmp_path.iterdir()) == []


def test_a_cpu_result_never_replaces_a_gpu_one(tmp_path) -> None:
    assert gen_throughput.result_paths(tmp_path, "cpu:x")[0].name == "gen_throughput.json"
    (tmp_path / "gen_scaling.json").write_text(json.dumps({"device": "cuda:NVIDIA H100 80GB HBM3"}))
    assert gen_throughput.result_paths(tmp_path, "cpu:x", "gen_scaling")[0].name == "gen_scaling.cpu.json"
    assert gen_throughput.result_paths(tmp_path, "cuda:y", "gen_scaling")[0].name == "gen_scaling.json"


def test_gen_benchmark_tiny_on_cpu_writes_a_full_report(tmp_path) -> None:
    gpu = {"device": "cuda:NVIDIA H100 80GB HBM3", "ours_img_per_s": 6.5}
    (tmp_path / "gen_throughput.json").write_text(json.dumps(gpu))
    argv = ["--preset", "tiny", "--steps", "2", "--plain-batch", "2", "--batch", "2", "--images", "2",
            "--plain-images", "1", "--results", str(tmp_path)]  # fmt: skip
    assert gen_throughput.main(argv) == 0
    assert json.loads((tmp_path / "gen_throughput.json").read_text()) == gpu  # the GPU result is kept
    report = json.loads((tmp_path / "gen_throughput.cpu.json").read_text())
    assert GEN_FIELDS <= set(report) and report["device"].startswith("cpu:")
    for key in GEN_FIELDS - {"device", "settings", "date", "compile_seconds"}:
        assert report[key] > 0, key
    assert report["compile_seconds"] >= 0 and report["ours_batch"] == 2 and report["plain_large_batch"] == 2
    assert report["settings"]["steps"] == 2 and report["settings"]["size"] == 32
    expected = report["ours_img_per_s"] / report["roofline_img_per_s"]
    assert report["roofline_fraction"] == pytest.approx(expected, rel=1e-2)
    assert "| ours (dfq worker) | 2 |" in (tmp_path / "gen_throughput.cpu.md").read_text()


@pytest.mark.slow
def test_scaling_benchmark_tiny_on_cpu_writes_a_full_report(ray_local, tmp_path) -> None:
    argv = ["--actors", "1", "--images-per-actor", "4", "--shard-size", "2", "--batch", "2", "--steps", "2",
            "--device", "cpu", "--results", str(tmp_path)]  # fmt: skip
    assert gen_scaling.main(argv) == 0
    report = json.loads((tmp_path / "gen_scaling.json").read_text())
    assert {"device", "rows", "date"} <= set(report) and report["device"].startswith("cpu:")
    (row,) = report["rows"]
    assert set(row) == ROW_FIELDS and row["actors"] == 1 and row["efficiency"] == 1.0
    assert row["img_per_s"] > 0 and row["driver_cpu_ms_per_image"] > 0
    assert "| 1 |" in (tmp_path / "gen_scaling.md").read_text()


@pytest.mark.slow
def test_flop_count_of_the_sd15_architecture_matches_the_h100_anchor() -> None:
    """On the meta device (no weights, no compute): 0.80 TFLOP a UNet sample-forward, 2.5 TFLOP a VAE
    decode, 82.8 TFLOP an image at 512 px, 50 steps, CFG (the measured anchor this project works from)."""
    from benchmarks.flops import image_flops, sd15_random_pipeline

    flops = image_flops(sd15_random_pipeline("meta"), 512, 512, 50, 3.5)
    assert flops["unet_forward_per_sample"] / 1e12 == pytest.approx(0.80, abs=0.01)
    assert flops["vae_decode"] / 1e12 == pytest.approx(2.5, abs=0.05)
    assert flops["per_image"] / 1e12 == pytest.approx(82.8, abs=0.1)


def test_scaling_rows_keep_the_design_fields_only() -> None:
    report = {"device": "cpu:x", "date": "d", "rows": [{"actors": 1, "img_per_s": 2.0, "efficiency": 1.0,
              "driver_cpu_ms_per_image": 0.5}], "details": {"rows": []}}  # fmt: skip
    assert "| 1 | 2 | 100% | 0.5 |" in gen_scaling.markdown(report)
