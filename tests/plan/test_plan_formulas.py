"""Hand-worked cases for the planner's formulas, and invariants that hold for every deployment."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tokenmill.plan import catalog, cost, perf
from tokenmill.plan.deployment import Deployment
from tokenmill.plan.model_spec import from_hf_config

REQUIRED_HARDWARE = [
    "h100-sxm",
    "h100-pcie",
    "a100-sxm-80g",
    "h200",
    "b200",
    "gb200",
    "mi300x",
    "mi325x",
    "tpu-v5e",
    "tpu-v5p",
    "tpu-v6e",
    "inferentia2",
    "trainium",
    "trainium2",
    "groq-lpu",
    "cerebras-wse3",
    "rtx-4090",
    "m1",
    "m1-max",
    "m2-ultra",
    "m3-max",
    "local",
]
REQUIRED_MODELS = [
    "llama-2-7b",
    "llama-2-13b",
    "llama-2-70b",
    "llama-3-8b",
    "llama-3-70b",
    "llama-3.1-8b",
    "llama-3.1-70b",
    "llama-3.1-405b",
    "llama-3.3-70b",
    "mixtral-8x7b",
    "qwen2.5-72b",
    "smollm2-135m",
    "smollm2-1.7b",
]


def dep(model="llama-3-70b", hardware="h100-sxm", **kw) -> Deployment:
    return Deployment(model=catalog.model(model), hardware=catalog.hardware(hardware), **kw)


def test_catalogs_hold_the_required_ids():
    assert set(REQUIRED_HARDWARE) <= set(catalog.hardware_ids())
    assert set(REQUIRED_MODELS) <= set(catalog.model_ids())


def test_every_hardware_number_cites_a_dated_reference():
    refs = catalog.references()
    for hid in catalog.hardware_ids():
        if hid == catalog.LOCAL_ID:
            continue
        hw = catalog.hardware(hid)
        assert {"memory", "compute"} <= set(hw.sources), hid
        if hw.power_w is not None:
            assert "power" in hw.sources, hid
        for key in [*hw.sources.values(), hw.price.source]:
            assert refs[key].date[:4].isdigit() and refs[key].url.startswith("http"), (hid, key)


@pytest.mark.parametrize(
    "model, billions",
    # Published parameter counts (model cards): 6.74B, 8.03B, 70.6B, 405.9B, 46.7B, 72.7B, 0.135B.
    [
        ("llama-2-7b", 6.74),
        ("llama-3-8b", 8.03),
        ("llama-3-70b", 70.55),
        ("llama-3.1-405b", 405.85),
        ("mixtral-8x7b", 46.70),
        ("qwen2.5-72b", 72.7),
        ("smollm2-135m", 0.1345),
    ],
)
def test_parameter_counts_match_published_sizes(model, billions):
    assert catalog.model(model).total_params / 1e9 == pytest.approx(billions, rel=0.01)


def test_70b_in_16_bit_is_141_gb():
    assert catalog.model("llama-3-70b").weight_bytes(16) / 1e9 == pytest.approx(141.1, abs=0.1)


def test_kv_cache_bytes_per_token():
    # 2 (K,V) x 80 layers x 8 KV heads x 128 dims x 2 bytes = 327,680 bytes.
    assert catalog.model("llama-3-70b").kv_bytes_per_token(16) == 327_680


def test_mixtral_reads_two_experts_at_batch_1_and_all_eight_at_large_batch():
    m = catalog.model("mixtral-8x7b")
    assert m.experts_touched(1) == pytest.approx(2.0)
    assert m.experts_touched(256) == pytest.approx(8.0, rel=1e-6)
    assert m.active_params / 1e9 == pytest.approx(12.9, rel=0.02)  # Mistral's "12.9B active"


def test_8x_h100_batch_1_lower_bound_is_about_5_3_ms():
    # 139 GB streamed per token (141 GB less the input embedding, which is gathered row by row)
    # over 8 x 3.35 TB/s = 5.19 ms; counting all 141 GB gives 5.26 ms.
    p = perf.predict(dep(chips=8))
    assert p.lower_bound_ms == pytest.approx(5.26, rel=0.03)
    assert p.ms_per_token > p.lower_bound_ms


def test_groq_needs_614_chips_for_16_bit_70b():
    m, groq = catalog.model("llama-3-70b"), catalog.hardware("groq-lpu")
    assert perf.physical_min_chips(m, groq, 16) == 614  # 141.1 GB / 0.23 GB = 613.5
    assert perf.min_chips(dep(hardware="groq-lpu")) >= 614  # plus the KV cache


def test_fewest_h100s_for_70b_is_two():
    assert perf.min_chips(dep(chips=1)) == 2
    assert not perf.fits(dep(chips=1)) and perf.fits(dep(chips=2))


def test_8_bit_weights_halve_the_weight_bytes_and_tp_splits_them():
    one = perf.predict(dep(chips=8)).decode
    eight = perf.predict(dep(chips=8, weight_bits=8)).decode
    assert eight.weight_bytes == pytest.approx(one.weight_bytes / 2)
    tp2 = perf.predict(dep(chips=2)).decode
    assert one.weight_bytes == pytest.approx(tp2.weight_bytes / 4)


def test_speculative_decoding_formula_and_effect():
    d = dep(chips=8, spec_tokens=4, acceptance=0.8)
    assert d.accepted_per_step == pytest.approx((1 - 0.8**5) / (1 - 0.8))
    assert perf.predict(d).ms_per_token < perf.predict(dep(chips=8)).ms_per_token
    with_draft = replace(d, draft=catalog.model("llama-3-8b"))
    assert perf.predict(with_draft).ms_per_token > perf.predict(d).ms_per_token


def test_cost_and_energy_formulas():
    assert cost.usd_per_million_tokens(8, 2.99, 83.2) == pytest.approx(
        8 * 2.99 / (83.2 * 3600) * 1e6
    )
    assert cost.implied_usd_per_chip_hour(79.86, 83.2, 8) == pytest.approx(2.99, rel=1e-3)
    p = perf.predict(dep(chips=8))
    assert p.usd_per_million_tokens == pytest.approx(8 * 2.99 / (p.tokens_per_s_total * 3600) * 1e6)
    assert p.joules_per_token == pytest.approx(8 * 700 / p.tokens_per_s_total)


def test_batch_max_fits_and_beats_batch_1_throughput():
    d = dep(chips=8)
    b = perf.best_batch(d)
    assert b > 1 and perf.fits(replace(d, batch=b))
    assert (
        perf.predict(replace(d, batch=b)).tokens_per_s_total
        > 10 * perf.predict(d).tokens_per_s_total
    )


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="divide"):
        dep(chips=8, tp=3)
    with pytest.raises(ValueError, match="no chip-to-chip link"):
        dep(model="llama-2-7b", hardware="m2-ultra", chips=2, tp=2)
    with pytest.raises(catalog.UnknownIdError, match="h100-sxm"):
        catalog.hardware("h100")


@settings(max_examples=60, deadline=None)
# two replicas for one sequence: total throughput counted a replica with nothing to run
@example(model="llama-2-7b", hardware="m1", bits=8.0, batch=1, chips_factor=2)
@given(
    model=st.sampled_from(REQUIRED_MODELS),
    hardware=st.sampled_from([h for h in REQUIRED_HARDWARE if h != "local"]),
    bits=st.sampled_from([16.0, 8.0, 4.5]),
    batch=st.integers(1, 256),
    chips_factor=st.integers(1, 2),
)
def test_prediction_never_beats_physics(model, hardware, bits, batch, chips_factor):
    base = dep(model, hardware, weight_bits=bits, batch=batch)
    try:
        chips = perf.min_chips(base) * chips_factor
    except ValueError:
        return  # does not fit on any layout of this chip (a 70B model on one Mac)
    p = perf.predict(replace(base, chips=chips))
    assert p.ms_per_token >= p.lower_bound_ms * (1 - 1e-9)
    assert p.tokens_per_s_total <= batch * p.tokens_per_s_per_user * (1 + 1e-9)


def test_hf_config_and_gguf_readers(tmp_path):
    config = {
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "max_position_embeddings": 8192,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = catalog.model(str(tmp_path))
    assert spec.total_params == catalog.model("llama-3-8b").total_params
    assert from_hf_config(config).kv_heads == 8


def test_gguf_metadata_of_the_default_model():
    try:
        from tokenmill.loader.resolve import ModelLoadError, default_model_path

        path = default_model_path()
    except (ImportError, OSError, ModelLoadError) as exc:  # the default model is not installed
        pytest.skip(f"no default GGUF: {exc}")
    spec = catalog.model(str(path))
    ref = catalog.model("smollm2-135m")
    assert (
        spec.layers,
        spec.hidden,
        spec.heads,
        spec.kv_heads,
        spec.ffn,
        spec.vocab,
        spec.tied,
    ) == (ref.layers, ref.hidden, ref.heads, ref.kv_heads, ref.ffn, ref.vocab, ref.tied)
    assert 4.0 < spec.file_bits_per_weight < 9.0  # a Q4_1 file, embeddings included


def test_local_hardware_from_cached_probes(_isolated_cache):
    from tokenmill.bench.bandwidth import machine_signature

    _isolated_cache.mkdir(parents=True)
    sig = machine_signature()
    (_isolated_cache / "bandwidth.json").write_text(
        json.dumps(
            {
                "copy_gbs": 28.0,
                "triad_gbs": 30.0,
                "size_mb": 512,
                "repeats": 10,
                "threads": 2,
                "machine": sig,
            }
        )
    )
    (_isolated_cache / "compute.json").write_text(
        json.dumps({"fp32_gflops": 100.0, "bf16_gflops": 150.0, "dispatch_us": 4.0, "machine": sig})
    )
    hw = catalog.hardware("local")
    assert hw.memory_gbs == 30.0 and hw.tflops["bf16"] == pytest.approx(0.15)
    p = perf.predict(Deployment(model=catalog.model("smollm2-135m"), hardware=hw))
    # 134.5M weights, of which 106M layers + 28M lm_head streamed: 0.27 GB / 30 GB/s = 9 ms.
    assert p.lower_bound_ms == pytest.approx(269e6 / 30e9 * 1e3, rel=0.1)
    assert p.ms_per_token > p.lower_bound_ms
