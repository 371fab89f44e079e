"""Benchmark scripts at tiny sizes: each baseline computes what the measured code computes, and every reported ratio
is the quotient of the reported timings. No timing thresholds."""

import json
import math

import pytest
import torch

from benchmarks import common
from benchmarks.common import time_call, time_interleaved
from benchmarks.sae_step import BenchmarkConfig, main, random_batches, run_lightning, run_plain
from saemnesia.sae import SparseAutoencoder

TINY = dict(d=16, latents=128, k=4, tokens=64, tokens_per_sample=16, steps=2, warmup=1)


def test_time_call_times_only_the_repeats_after_warmup():
    calls = []
    timing = time_call(lambda: calls.append(len(calls)), warmup=2, repeats=3)
    assert len(calls) == 5 and timing.calls == 3
    assert timing.seconds >= 0 and timing.per_call == pytest.approx(timing.seconds / 3)
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_call(lambda: None, warmup=0, repeats=0)


def test_time_interleaved_alternates_the_candidates_and_reports_medians(monkeypatch):
    """A fake clock that each call advances by a scripted duration: medians must ignore each candidate's outlier."""
    clock, calls = [0.0], []
    durations = iter([0.0, 0.0, 3.0, 1.0, 1.0, 2.0, 2.0, 9.0])  # the warm-up round, then a and b in each round
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])

    def candidate(name: str):
        def call() -> None:
            calls.append(name)
            clock[0] += next(durations)
        return call

    medians = time_interleaved({"a": candidate("a"), "b": candidate("b")}, warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4
    assert medians == {"a": 2.0, "b": 2.0}  # a: 3, 1, 2; b: 1, 2, 9
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_interleaved({"a": lambda: None}, warmup=0, repeats=0)


def test_sae_step_prints_one_json_report_with_positive_finite_ratios(capsys):
    report = main([f"--{name}={value}" for name, value in TINY.items()])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == report
    assert report["config"]["d"] == TINY["d"] and report["config"]["objective"] == "both"
    assert set(report["objectives"]) == {"unsupervised", "supervised"}
    encoder_matmul = 2 * TINY["tokens"] * TINY["d"] * TINY["latents"]
    # The sparse encoder backward (default) leaves the unsupervised step one dense matmul; supervised keeps three.
    assert report["objectives"]["unsupervised"]["step_flops"] == encoder_matmul
    assert report["objectives"]["supervised"]["step_flops"] == 3 * encoder_matmul
    for figures in report["objectives"].values():
        assert set(figures) == {"step_flops", "module_tokens_per_s", "plain_tokens_per_s", "module_vs_plain",
                                "module_matmul_fraction", "plain_matmul_fraction"}
        assert all(math.isfinite(value) and value > 0 for value in figures.values())
        assert figures["module_vs_plain"] == pytest.approx(figures["module_tokens_per_s"]
                                                           / figures["plain_tokens_per_s"])
    kernels = report["kernels"]
    for name in ("encoder", "auxk", "decoder", "batch_topk"):
        assert kernels[f"{name}_dense_over_sparse"] == pytest.approx(kernels[f"{name}_dense_s"]
                                                                     / kernels[f"{name}_sparse_s"])
    assert kernels["max_relative_gradient_difference"] < 1e-5  # float32: both encoder backwards compute one gradient


@pytest.mark.parametrize(("objective", "encoder_backward"),
                         [("unsupervised", "sparse"), ("unsupervised", "dense"), ("supervised", "sparse")])
def test_plain_loop_trains_the_same_sae_as_the_lightning_module(objective, encoder_backward):
    """The baseline is only fair if it does the same math: from the same seed and batches, both paths must end
    with the same weights. A low dead threshold makes latents die after one step, so AuxK runs too, and a tiny clip
    norm makes clipping act."""
    config = BenchmarkConfig(**{**TINY, "steps": 3}, objective=objective, dead_feature_threshold=TINY["tokens"],
                             grad_clip=1e-3, encoder_backward=encoder_backward)
    batches = random_batches(config, objective)
    lightning_sae = run_lightning(config, objective, batches).sae
    plain_sae = run_plain(config, objective, batches).sae
    torch.manual_seed(config.seed)
    initial = SparseAutoencoder(config.d, config.sae_config(objective)).state_dict()
    for name, value in plain_sae.state_dict().items():
        torch.testing.assert_close(lightning_sae.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(plain_sae.state_dict()["encoder.weight"], initial["encoder.weight"])


@pytest.mark.parametrize(("options", "message"), [
    (dict(tokens=100, tokens_per_sample=16), "multiple of --tokens_per_sample"),
    (dict(warmup=0), "--warmup must be at least 1"),
    (dict(latents=64, objective="supervised"), "--latents must be at least 70"),
    (dict(kernel_repeats=-1), "--kernel_repeats must be 0"),
])
def test_bad_benchmark_options_fail_with_one_clear_sentence(options, message):
    with pytest.raises(ValueError, match=message):
        BenchmarkConfig(**{**TINY, **options})


def test_eraser_benchmark_agrees_with_its_dense_baseline(capsys):
    from benchmarks import eraser

    report = eraser.main(["--batch=2", "--d=16", "--latents=256", "--k=4", "--steps=3", "--repeats=1",
                          "--warmup=0", "--generation_prompts=2", "--generation_steps=2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(report))
    cost, generation = report["unet_call"], report["generation"]
    # Both paths erase the same tokens (some, not none) to the same values, so the timings compare equal work.
    assert cost["max_abs_difference"] < 1e-5 and cost["tokens_changed"] > 0
    assert cost["eraser_over_dense"] == pytest.approx(cost["eraser_s"] / cost["dense_s"])
    encoder_flops = 2 * 2 * 16 * 16 * 16 * 256  # [B·H·W, d] × [d, L]
    assert cost["eraser_matmul_fraction"] == pytest.approx(encoder_flops / (cost["eraser_s"]
                                                                            * cost["matmul_flops_per_s"]))
    assert generation["hooked_over_unhooked"] == pytest.approx(generation["hooked_s"] / generation["unhooked_s"])
    assert generation["mixed_over_per_concept"] == pytest.approx(generation["mixed_s"] / generation["per_concept_s"])


def test_dense_baseline_is_the_eraser_written_out():
    """The baseline must compute the eraser's result on a case where several tokens fire, else its time means
    nothing; a wrong scale or threshold in either would show here."""
    from benchmarks.eraser import EraserBenchmarkConfig, build_eraser, dense_erase

    config = EraserBenchmarkConfig(batch=2, height=4, width=4, d=16, latents=64, k=8, steps=2, percentile=90.0,
                                   multiplier=-3.0)
    eraser, hidden = build_eraser(config)
    for step in range(config.steps):
        erased = eraser.apply(hidden, step)
        assert (erased != hidden).any(dim=1).sum() > 4
        torch.testing.assert_close(dense_erase(eraser.sae, eraser.tables, hidden, step), erased)


def test_cache_overhead_benchmark_reports_both_measurements(capsys, tiny_pipeline_dir):
    from benchmarks import cache_overhead

    report = cache_overhead.main([f"--pipeline={tiny_pipeline_dir}", "--batch_size=2", "--num_steps=2", "--repeats=1",
                                  "--warmup=0", "--payload_batch=1", "--payload_channels=8", "--payload_side=2",
                                  "--payload_steps=2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(report))
    generation, payload = report["generation"], report["sd15_payload"]
    assert generation["overhead"] == pytest.approx(generation["capture_write_s_per_batch"]
                                                   / generation["plain_s_per_batch"] - 1)
    assert payload["s_per_map"] == pytest.approx(payload["s_per_step"])  # one map per step at payload_batch=1
    assert payload["s_per_image"] == pytest.approx(payload["s_per_map"] * report["config"]["published_steps"])
    assert payload["MB_per_s"] == pytest.approx(2 * 2 * 8 * 2 / 1e6 / payload["s_per_map"])  # float16 [2·2, 8] map


def test_gpu_suite_runs_on_a_cpu_at_tiny_sizes_and_appends_its_markdown_section(capsys, tmp_path):
    from benchmarks import gpu_suite

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nEarlier runs.\n")
    sae = dict(device="cpu", d=16, latents=128, k=4, tokens=64, tokens_per_sample=16, steps=1, warmup=1,
               kernel_repeats=1)
    eraser = dict(device="cpu", batch=2, height=1, width=1, d=16, latents=128, k=4, steps=2, dtype="float32",
                  repeats=1, warmup=0, generation_pipeline="tiny", generation_resolution=32, generation_steps=2,
                  generation_prompts=1, generation_k=4, generation_repeats=1)
    report = gpu_suite.main([f"--sae.{name}={value}" for name, value in sae.items()]
                            + [f"--eraser.{name}={value}" for name, value in eraser.items()]
                            + [f"--markdown={results}"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(report))
    assert set(report["sae"]) == {"32-true", "bf16-mixed"}
    assert report["eraser"]["max_abs_difference"] < 1e-5  # the eraser agrees with the dense reference hook
    assert report["generation"]["hooked_s"] > 0 and report["generation"]["unhooked_s"] > 0
    assert report["matmul_settings"]["float32_matmul_precision"] == "highest"
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nEarlier runs.\n\n### ")  # appended after the old content
    assert f"### {report['machine']['device']}, {report['date']}" in text
    assert text.count("| 32-true | ") == text.count("| bf16-mixed | ") == 3  # two objectives + the kernel row


def test_gpu_suite_refuses_cuda_without_a_gpu():
    from benchmarks.gpu_suite import SuiteConfig

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ValueError, match="--sae.device / --eraser.device cuda needs a visible CUDA GPU"):
        SuiteConfig()


STREAM_TINY = dict(d=8, side=2, samples=16, samples_per_shard=4, token_batch=8, map_batch=2, token_buffer=16,
                   map_buffer=4)


def test_stream_benchmark_counts_what_each_reader_reads(tmp_path):
    from benchmarks.stream import StreamBenchmarkConfig, datamodule, raw_read, stream_read, tarfile_read, write_shards

    config = StreamBenchmarkConfig(**STREAM_TINY)
    paths = write_shards(config, tmp_path)
    assert len(paths) == 4 and raw_read(paths) == sum(path.stat().st_size for path in paths)
    payload = config.samples * config.side ** 2 * config.d * 2  # the float16 maps
    assert payload < tarfile_read(paths) < raw_read(paths)  # members add npy headers and json; files add tar headers
    for token_level in (True, False):  # an epoch delivers the folder's payload once
        assert stream_read(datamodule(config, tmp_path, token_level=token_level, workers=0)) == payload
    with pytest.raises(ValueError, match="--samples .* must fill at least two shards"):
        StreamBenchmarkConfig(samples=4, samples_per_shard=4)


def test_stream_benchmark_reports_every_stream_against_the_raw_read(capsys):
    from benchmarks import stream

    report = stream.main([f"--{name}={value}" for name, value in STREAM_TINY.items()]
                         + ["--workers=[0, 1]", "--repeats=1", "--warmup=0"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(report))
    assert set(report["streams"]) == {"token_workers0", "token_workers1", "map_workers0", "map_workers1"}
    for figures in report["streams"].values():
        assert all(math.isfinite(value) and value > 0 for value in figures.values())
        assert figures["vs_raw"] == pytest.approx(figures["MB_per_s"] / report["baselines"]["raw_read_MB_per_s"])
