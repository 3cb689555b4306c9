"""The multi-round KV reuse benchmark: workload spec, conversations, and modes that compute less but
produce the same tokens (random-weight model, float32, tiny lengths)."""
import pytest

from nanoflow.bench.workloads import parse_multiturn, sample_conversations
from tests.helpers import save_tiny_hf_model


def test_parse_multiturn():
    assert parse_multiturn("multiturn:lmsys") == ("lmsys", 3, 5)
    assert parse_multiturn("multiturn:sharegpt:rounds=2-4") == ("sharegpt", 2, 4)
    assert parse_multiturn("multiturn:lmsys:rounds=3") == ("lmsys", 3, 3)
    for bad in ("multiturn:", "multiturn:foo", "multiturn:lmsys:rounds=5-3", "multiturn:lmsys:turns=3"):
        with pytest.raises(ValueError):
            parse_multiturn(bad)


def test_conversations_are_seeded_and_fit():
    a = sample_conversations("multiturn:lmsys:rounds=3-5", 6, 1, 1000, 400, max_input=64, max_output=32)
    b = sample_conversations("multiturn:lmsys:rounds=3-5", 6, 1, 1000, 400, max_input=64, max_output=32)
    assert [c.user for c in a] == [c.user for c in b] and [c.output_lens for c in a] == [c.output_lens for c in b]
    for c in a:
        assert 1 <= c.num_rounds <= 5 and len(c.output_lens) == c.num_rounds
        assert sum(map(len, c.user)) + sum(c.output_lens) <= 400
        assert all(1 <= len(u) <= 64 for u in c.user) and all(1 <= n <= 32 for n in c.output_lens)


@pytest.mark.slow
def test_modes_compute_less_and_agree(tmp_path):
    from nanoflow import LLM
    from nanoflow.bench.multiturn import _configure, drive
    llm = LLM("dummy:smollm2-135m", dtype="float32", block_size=8, max_model_len=512)
    convs = sample_conversations("multiturn:lmsys:rounds=3", 3, 0, llm.model_config.vocab_size, 512,
                                 max_input=24, max_output=6)
    rows, outs = {}, {}
    for mode in ("off", "device", "full"):
        outs[mode] = {}
        _configure(llm.engine, mode, 12, 4 * 30 * 2 * 8 * 3 * 64 * 4, 1 << 26, str(tmp_path / mode))
        rows[mode] = drive(llm.engine, convs, outs[mode])
        if llm.engine.kv_tiers is not None:
            llm.engine.kv_tiers.close(persist=False)
    assert outs["device"] == outs["off"] and outs["full"] == outs["off"]
    assert rows["off"]["prefix_hit_tokens"] == 0
    assert rows["device"]["prefill_computed"] < rows["off"]["prefill_computed"]
    assert rows["full"]["tier_hit_tokens"] > 0  # a 12-block pool cannot keep three conversations' history
    for r in rows.values():
        assert r["prefill_computed"] + r["prefix_hit_tokens"] + r["tier_hit_tokens"] >= r["prompt_tokens"]


def test_modes_agree_on_a_tiny_model(tmp_path):
    """The same three modes on a tiny random model: fast, and every line of bench/multiturn.py runs."""
    from nanoflow import LLM
    from nanoflow.bench.multiturn import _configure, drive
    llm = LLM(save_tiny_hf_model(tmp_path / "model", vocab_size=512), dtype="float32", block_size=8,
              max_model_len=256, num_kv_blocks=64)
    cfg = llm.model_config
    block_bytes = cfg.num_layers * 2 * 8 * cfg.num_kv_heads * cfg.head_dim * 4
    convs = sample_conversations("multiturn:lmsys:rounds=3", 3, 0, cfg.vocab_size, 256, max_input=24, max_output=6)
    rows, outs = {}, {}
    for mode in ("off", "device", "full"):
        outs[mode] = {}
        _configure(llm.engine, mode, 12, 4 * block_bytes, 1 << 20, str(tmp_path / mode))
        rows[mode] = drive(llm.engine, convs, outs[mode])
        if llm.engine.kv_tiers is not None:
            llm.engine.kv_tiers.close(persist=False)
    assert outs["device"] == outs["off"] and outs["full"] == outs["off"]
    assert rows["device"]["prefill_computed"] < rows["off"]["prefill_computed"]
    assert rows["full"]["tier_hit_tokens"] > 0
