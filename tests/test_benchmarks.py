"""Benchmark scripts at tiny sizes: the report's shape, and that the plain baseline computes what SAEModule does.

No timing thresholds: only that figures exist and are positive finite numbers.
"""

import json
import math

import pytest
import torch

from benchmarks.common import time_call
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


def test_sae_step_prints_one_json_report_with_positive_finite_ratios(capsys):
    report = main([f"--{name}={value}" for name, value in TINY.items()])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == report
    assert report["config"]["d"] == TINY["d"] and report["config"]["objective"] == "both"
    assert report["step_flops"] == 6 * TINY["tokens"] * TINY["d"] * TINY["latents"]
    assert set(report["objectives"]) == {"unsupervised", "supervised"}
    for figures in report["objectives"].values():
        assert set(figures) == {"module_tokens_per_s", "plain_tokens_per_s", "module_vs_plain",
                                "module_matmul_fraction", "plain_matmul_fraction"}
        assert all(math.isfinite(value) and value > 0 for value in figures.values())
        assert figures["module_vs_plain"] == pytest.approx(figures["module_tokens_per_s"]
                                                           / figures["plain_tokens_per_s"])


@pytest.mark.parametrize("objective", ["unsupervised", "supervised"])
def test_plain_loop_trains_the_same_sae_as_the_lightning_module(objective):
    """The baseline is only fair if it does the same math: from the same seed and batches, both paths must end
    with the same weights. A low dead threshold makes latents die after one step, so AuxK runs too, and a tiny clip
    norm makes clipping act."""
    config = BenchmarkConfig(**{**TINY, "steps": 3}, objective=objective, dead_feature_threshold=TINY["tokens"],
                             grad_clip=1e-3)
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
])
def test_bad_benchmark_options_fail_with_one_clear_sentence(options, message):
    with pytest.raises(ValueError, match=message):
        BenchmarkConfig(**{**TINY, **options})


def test_eraser_benchmark_agrees_with_its_dense_baseline(capsys):
    from benchmarks import eraser

    report = eraser.main(["--batch=2", "--d=16", "--latents=256", "--k=4", "--steps=3", "--repeats=1",
                          "--warmup=0", "--generation_prompts=2", "--generation_steps=2"])
    assert report["generation"]["hooked_s"] > 0 and report["generation"]["unhooked_s"] > 0
    cost = report["unet_call"]
    assert cost["max_abs_difference"] < 1e-5
    assert all(cost[name] > 0 for name in ("eraser_s", "dense_s", "encoder_s"))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(report))


def test_cache_overhead_benchmark_reports_both_measurements(capsys, tiny_pipeline_dir):
    from benchmarks import cache_overhead

    report = cache_overhead.main([f"--pipeline={tiny_pipeline_dir}", "--batch_size=2", "--num_steps=2", "--repeats=1",
                                  "--warmup=0", "--payload_batch=1", "--payload_channels=8", "--payload_side=2",
                                  "--payload_steps=2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(report))
    numbers = [value for value in json.loads(json.dumps(report)).values() if isinstance(value, dict)]
    figures = [v for section in numbers for v in section.values() if isinstance(v, (int, float))]
    assert figures and all(math.isfinite(v) for v in figures)
