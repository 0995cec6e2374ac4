"""The Llama decoder-only LM (LLaVA-style report generation) against HuggingFace's LlamaForCausalLM
(../shared/oracles/llama_hf.safetensors), its KV cache, grouped-query attention, tying and strict loading."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from conftest import read_oracle
from model import (Llama, LlamaCache, llama_beam_search, llama_config, llama_config_from_hf, llama_from_hf_state,
                   llama_greedy_search, load_llama)

TOL = 1e-4


# ---------------------------------------------------------------------------- Llama vs HuggingFace

@pytest.fixture(scope="module")
def llama_oracle(oracles_dir):
    tensors, weights, meta = read_oracle(oracles_dir / "llama_hf.safetensors")
    model = llama_from_hf_state(weights, llama_config_from_hf(meta["config"])).eval()
    return tensors, weights, meta, model


@torch.no_grad()
def test_llama_matches_hf_logits_over_an_embedding_prefix_and_tokens(llama_oracle):
    tensors, _, _, model = llama_oracle
    logits = model(tensors["input.ids"], inputs_embeds=tensors["input.prefix_embeds"])
    assert logits.shape == tensors["out.logits"].shape
    assert (logits - tensors["out.logits"]).abs().max() < TOL


def test_greedy_reproduces_hf_generate_from_inputs_embeds(llama_oracle):
    tensors, _, _, model = llama_oracle
    assert torch.equal(llama_greedy_search(model, tensors["input.prefix_embeds"], 10), tensors["out.greedy_new10"])


def test_beam3_reproduces_hf_generate_from_inputs_embeds(llama_oracle):
    tensors, _, meta, model = llama_oracle
    out = llama_beam_search(model, tensors["input.prefix_embeds"], num_beams=3, max_new_tokens=10, length_penalty=1.0)
    # HF's beam search fills after eos with `pad_token_id or eos_token_id`, so eos where pad is 0 (falsy);
    # we pad with pad_token_id as greedy does
    expected = tensors["out.beam3_new10"].clone()
    eos, pad = meta["config"]["eos_token_id"], meta["config"]["pad_token_id"]
    after_eos = (expected == eos).long().cumsum(dim=1) - (expected == eos).long() > 0
    expected[after_eos] = pad
    assert after_eos.any(), "the case should hold a hypothesis that ends before the limit"
    assert torch.equal(out, expected)


@torch.no_grad()
def test_load_llama_reads_hf_folders_files_and_shards(llama_oracle, tmp_path):
    tensors, weights, meta, _ = llama_oracle
    with_config = tmp_path / "hf"
    with_config.mkdir()
    save_file(weights, str(with_config / "model.safetensors"))
    (with_config / "config.json").write_text(json.dumps(meta["config"]))
    bare = tmp_path / "bare.safetensors"
    save_file(weights, str(bare))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(sharded / shard))
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "config.json").write_text(json.dumps(meta["config"]))
    heads = meta["config"]["num_attention_heads"]
    for model in (load_llama(with_config), load_llama(bare, num_attention_heads=heads), load_llama(sharded)):
        logits = model.eval()(tensors["input.ids"], inputs_embeds=tensors["input.prefix_embeds"])
        assert (logits - tensors["out.logits"]).abs().max() < TOL
    # RoPE has no position table, so the shapes cannot tell max_position_embeddings
    inferred = replace(load_llama(bare, num_attention_heads=heads).config, max_position_embeddings=128)
    assert inferred == load_llama(with_config).config


def test_load_llama_without_config_asks_for_the_head_count(llama_oracle, tmp_path):
    _, weights, _, _ = llama_oracle
    save_file(weights, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="num_attention_heads"):
        load_llama(tmp_path / "bare.safetensors")


@pytest.mark.parametrize("damage, key", [
    (lambda w: w.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight"),
    (lambda w: w.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
     "model.layers.0.self_attn.q_proj.bias"),
    (lambda w: w.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}),
     "model.layers.0.self_attn.k_proj.weight"),  # 4 KV heads' worth where the config says 2
], ids=["missing", "unexpected", "wrong shape"])
def test_strict_loading_names_the_offending_key(llama_oracle, damage, key):
    _, weights, meta, _ = llama_oracle
    damaged = dict(weights)
    damage(damaged)
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        llama_from_hf_state(damaged, llama_config_from_hf(meta["config"]))


# ---------------------------------------------------------------------------- config.json

def test_config_from_hf_reads_rope_theta_from_either_transformers_layout():
    v4 = {"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 500000.0, "rope_scaling": None}
    v5 = {"hidden_size": 64, "num_attention_heads": 4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    assert llama_config_from_hf(v4).rope_theta == llama_config_from_hf(v5).rope_theta == 500000.0


def test_config_from_hf_rejects_scaled_rope():
    llama31 = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_theta": 500000.0}
    with pytest.raises(ValueError, match="llama3"):
        llama_config_from_hf(llama31)


# ---------------------------------------------------------------------------- properties

def random_llama(seed=0, **overrides):
    """A tiny Llama whose random weights are large enough that its predictions vary with the input
    (at HF's init scale of 0.02 the logits are nearly flat)."""
    torch.manual_seed(seed)
    config = {"vocab_size": 50, "num_key_value_heads": 2, "max_position_embeddings": 64, **overrides}
    model = Llama(llama_config("tiny", **config))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 2.0 / p.shape[1] ** 0.5)
    return model.eval()


@torch.no_grad()
def test_kv_cached_steps_give_the_same_logits_as_full_recomputation():
    model = random_llama()
    prefix, ids = torch.randn(3, 5, 64), torch.randint(0, 50, (3, 8))
    full = model(ids, inputs_embeds=prefix)
    cache = LlamaCache()
    steps = [model(inputs_embeds=prefix, cache=cache), model(ids[:, :2], cache=cache)]  # a chunk after the prefix
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(2, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-4)


@torch.no_grad()
def test_greedy_with_kv_cache_equals_greedy_recomputing_everything():
    model = random_llama(seed=1, eos_token_id=3)
    prefix = torch.randn(4, 5, 64)
    cached = llama_greedy_search(model, prefix, 12)
    seqs = torch.empty(4, 0, dtype=torch.long)
    running = torch.ones(4, dtype=torch.bool)
    for _ in range(12):  # no cache: prefix and all tokens so far through the model every step
        next_ids = torch.where(running, model(seqs, inputs_embeds=prefix)[:, -1].argmax(-1), 0)
        seqs = torch.cat([seqs, next_ids[:, None]], dim=1)
        running &= next_ids != 3
    assert torch.equal(cached, seqs[:, :cached.shape[1]])
    assert (seqs[:, cached.shape[1]:] == 0).all()
    ended = (cached == 3).any(dim=1)
    assert ended.any() and not ended.all(), "the case should mix early ends with runs to the limit"


@torch.no_grad()
def test_beam_search_with_one_beam_is_greedy():
    model = random_llama(seed=1, eos_token_id=3)
    prefix = torch.randn(6, 5, 64)
    greedy = llama_greedy_search(model, prefix, 12)
    assert torch.equal(llama_beam_search(model, prefix, num_beams=1, max_new_tokens=12), greedy)


@torch.no_grad()
def test_grouped_query_attention_equals_multi_head_attention_with_repeated_kv_heads():
    """num_key_value_heads=2 with 4 query heads is plain multi-head attention whose K/V projections repeat
    each KV head for its run of consecutive query heads (0 and 1 share KV head 0, 2 and 3 KV head 1)."""
    gqa = random_llama(num_key_value_heads=2)
    mha = Llama(llama_config("tiny", vocab_size=50, num_key_value_heads=4, max_position_embeddings=64)).eval()
    state = gqa.state_dict()
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = state[key].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    ids, prefix = torch.randint(0, 50, (2, 6)), torch.randn(2, 3, 64)
    torch.testing.assert_close(mha(ids, inputs_embeds=prefix), gqa(ids, inputs_embeds=prefix))


def test_tied_output_layer_is_the_embedding():
    model = random_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        model.model.embed_tokens.weight[7] += 1.0
    assert torch.equal(model.lm_head.weight[7], model.model.embed_tokens.weight[7])


def test_tied_loading_accepts_an_equal_or_absent_lm_head_and_rejects_a_different_one():
    source = random_llama(tie_word_embeddings=True)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    without_head = {k: v for k, v in state.items() if k != "lm_head.weight"}
    for weights in (state, without_head):
        loaded = llama_from_hf_state(weights, source.config)
        assert torch.equal(loaded.lm_head.weight, source.model.embed_tokens.weight)
    different = dict(state, **{"lm_head.weight": state["lm_head.weight"] + 1.0})
    with pytest.raises(KeyError, match="lm_head.weight"):
        llama_from_hf_state(different, source.config)
