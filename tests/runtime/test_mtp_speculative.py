"""MTP speculative decoding: loading, greedy exactness, cache roll-back, statistics, CLI and API errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3.cli import main as cli_main
from dsv3.errors import Dsv3Error
from dsv3.runtime.generate import SamplingParams, generate
from dsv3.runtime.speculative import RowSampler, SpecDecoder, generate_speculative
from tests.helpers import make_checkpoint, pattern_tokens, train_on_patterns

VOCAB = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny vocab-16 checkpoint with an MTP layer, and a state_dict trained so drafts are often right."""
    path = make_checkpoint(tmp_path_factory.mktemp("mtp") / "ckpt", seed=3, mtp=True, vocab_size=VOCAB)
    model = dsv3.load(path, dtype="float32").model
    return path, train_on_patterns(model, steps=60, seed=0)


def _engine(trained, attn_impl: str):
    path, state = trained
    engine = dsv3.load(path, dtype="float32", attn_impl=attn_impl)
    engine.model.load_state_dict(state)
    return engine


def _prompts() -> list[list[int]]:
    """Prompts of different lengths: progressions (drafts mostly right) and one irregular prompt."""
    g = torch.Generator().manual_seed(7)
    prompts = [[0] + pattern_tokens(1, n, VOCAB, g)[0].tolist() for n in (2, 6, 3)]
    return prompts + [[0, 9, 4, 4, 13, 2, 7, 7, 3]]


def test_mtp_tensors_are_loaded_from_the_checkpoint(tiny_ckpt):
    model = dsv3.load(tiny_ckpt, dtype="float32").model
    tensors = load_file(str(tiny_ckpt / "model.safetensors"))
    n = model.cfg.num_hidden_layers
    assert len(model.mtp) == 1
    torch.testing.assert_close(model.mtp[0].eh_proj.weight, tensors[f"model.layers.{n}.eh_proj.weight"])
    torch.testing.assert_close(
        model.mtp[0].block.attn.wkv_a.weight, tensors[f"model.layers.{n}.self_attn.kv_a_proj_with_mqa.weight"]
    )


def test_checkpoint_missing_one_mtp_tensor_is_a_clear_error(tiny_ckpt, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    n = json.loads((broken / "config.json").read_text())["num_hidden_layers"]
    del tensors[f"model.layers.{n}.hnorm.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Dsv3Error, match=f"model.layers.{n}.hnorm.weight"):
        dsv3.load(broken, dtype="float32")


def test_checkpoint_without_mtp_runs_and_refuses_mtp(tmp_path, capsys):
    path = make_checkpoint(tmp_path / "plain", mtp=False)
    engine = dsv3.load(path, dtype="float32")
    assert engine.cfg.num_nextn_predict_layers == 0 and len(engine.model.mtp) == 0
    assert len(engine.generate([[0, 5, 6]], 3)[0].token_ids) == 3
    with pytest.raises(Dsv3Error, match=r"checkpoint has no MTP layers \(num_nextn_predict_layers=0\)"):
        engine.generate([[0, 5, 6]], 3, mtp=1)
    capsys.readouterr()  # drop what making the checkpoint printed
    rc = cli_main(["run", "--ckpt-path", str(path), "--prompt", "x", "--mtp", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint has no MTP layers (num_nextn_predict_layers=0)" in err
    assert len(err.strip().splitlines()) == 1


def test_negative_mtp_is_an_error(tiny_ckpt):
    engine = dsv3.load(tiny_ckpt, dtype="float32")
    with pytest.raises(Dsv3Error, match="mtp"):
        engine.generate([[0, 5]], 2, mtp=-1)


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_stale_cache_entries_past_a_position_are_never_read(tiny_ckpt, attn_impl):
    """Rolling back is resetting a row's position: garbage past it must not change any output."""
    model = dsv3.load(tiny_ckpt, dtype="float32", attn_impl=attn_impl).model
    tokens = torch.tensor([[0, 5, 9, 13, 20, 31]])
    clean = model.new_cache(1, 16, page_size=4)  # pages of 4: the garbage spans pages (absorbed form)
    dirty = model.new_cache(1, 16, page_size=4)
    with torch.no_grad():
        model(tokens[:, :4], torch.arange(4).unsqueeze(0), clean)
        model(tokens[:, :4], torch.arange(4).unsqueeze(0), dirty)
        for layer in dirty.main + dirty.mtp:  # as if rejected drafts had been written at positions 4..
            if layer.paged:
                j = torch.arange(4, 16)
                page, size = dirty.block_table[0, j // 4].long(), layer.pages.shape[1]
                layer.pages[page, j % size] = torch.randn(12, layer.pages.shape[2]) * 10.0
            else:
                for buf in layer.tensors.values():
                    buf[:, 4:].normal_(0.0, 10.0)
        pos = torch.tensor([[4, 5]])
        a = model(tokens[:, 4:], pos, clean)
        b = model(tokens[:, 4:], pos, dirty)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_greedy_with_mtp_equals_plain_generation(trained, attn_impl):
    engine = _engine(trained, attn_impl)
    prompts = _prompts()
    plain = [c.token_ids for c in engine.generate(prompts, 20)]
    for k in (1, 2, 3):
        got = engine.generate(prompts, 20, mtp=k)
        assert [c.token_ids for c in got] == plain, f"mtp={k}"
        accepted = sum(c.mtp["accepted"][0] for c in got)
        steps = sum(c.mtp["steps"] for c in got)
        # both paths ran: some drafts accepted, some rejected (the caches were rolled back)
        assert 0 < accepted < steps, (k, accepted, steps)
        assert all(len(c.mtp["acceptance_rate"]) == k for c in got)
    for p, want in zip(prompts, plain, strict=True):  # unbatched
        for k in (1, 2, 3):
            assert engine.generate([p], 20, mtp=k)[0].token_ids == want, (p, k)


def test_greedy_with_mtp_equals_plain_with_untrained_drafts(tiny_ckpt):
    """Random MTP weights: drafts are (nearly) always rejected; output must still be exact."""
    engine = dsv3.load(tiny_ckpt, dtype="float32")
    prompts = [[0, 5, 7, 9, 11], [0, 3], [0, 20, 21, 22, 23, 24, 25, 26, 40]]
    plain = [c.token_ids for c in engine.generate(prompts, 12)]
    for k in (1, 3):
        assert [c.token_ids for c in engine.generate(prompts, 12, mtp=k)] == plain


def test_eos_budget_and_context_limit_with_mtp(trained):
    """Rows stop at EOS at different steps; drafts past max_new_tokens and past the context limit are harmless."""
    model = _engine(trained, "absorb").model
    prompts = _prompts()
    for eos in ((), (5,), (9, 12)):
        for max_new in (1, 2, 7):
            params = SamplingParams(max_new, 0.0, 1.0, None, eos)
            want = generate(model, prompts, params)
            for k in (1, 3):
                got = generate_speculative(model, prompts, params, k)
                assert got.token_ids == want.token_ids and got.finish_reasons == want.finish_reasons
    limit = model.cfg.max_position_embeddings
    g = torch.Generator().manual_seed(1)
    long = [[0] + pattern_tokens(1, limit - 9, VOCAB, g)[0].tolist(), [0, 4, 7]]
    params = SamplingParams(8, 0.0, 1.0, None, ())  # the long row ends exactly at the last position
    assert generate_speculative(model, long, params, 3).token_ids == generate(model, long, params).token_ids


def test_cli_jsonl_carries_mtp_stats_and_stderr_summary(tiny_ckpt, tmp_path, capsys):
    import shutil

    from tests.helpers import add_tiny_tokenizer

    ckpt = tmp_path / "with_tokenizer"
    shutil.copytree(tiny_ckpt, ckpt)
    add_tiny_tokenizer(ckpt)
    args = ["run", "--ckpt-path", str(ckpt), "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "6"]
    args += ["--output-format", "jsonl", "--mtp", "2", "--prompt", "the cat sat", "--prompt", "hello"]
    assert cli_main(args) == 0
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 2
    for r in records:
        m = r["mtp"]
        assert m["k"] == 2 and len(m["accepted"]) == 2 and len(m["acceptance_rate"]) == 2
        assert m["steps"] >= 1 and 1.0 <= m["tokens_per_forward"] <= 3.0 and m["tokens_per_s"] > 0
    summary = [line for line in err.splitlines() if "mtp k=2" in line]
    assert len(summary) == 1 and "tokens per main-model forward" in summary[0] and "tokens/s" in summary[0]
    # without --mtp the records have no "mtp" field and the output is the same tokens
    assert cli_main([a for a in args if a not in ("--mtp", "2")]) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["token_ids"] for r in plain] == [r["token_ids"] for r in records]
    assert all("mtp" not in r for r in plain)


def _simulated_accepts(model, prompt: list[int], n_out: int, k: int) -> list[int]:
    """Accepted drafts per position, recomputed without any cache from the greedy continuation.

    The MTP entry at position t is built from the main hidden state at t and token t+1, so one
    full-sequence MTP forward over the final sequence gives every exact draft-1 logit; draft 2
    reuses the module on its own output one position further.
    """
    ext = prompt + generate(model, [prompt], SamplingParams(n_out + k + 1, 0.0, 1.0, None, ())).token_ids[0]
    seq = torch.tensor([ext])
    t = seq.shape[1]
    h = model(seq)  # (1, T, D)
    g = model.mtp_forward(0, h[:, : t - 1], seq[:, 1:], torch.arange(t - 1).unsqueeze(0))  # (1, T-1, D)
    accepted = [0] * k
    p, produced = len(prompt), 1
    while produced < n_out:
        d1 = int(model.mtp[0].logits(g[0, p - 1]).argmax())
        a = int(d1 == ext[p + 1])
        if k == 2 and a:
            hid = torch.cat([h[:, :p], g[:, p - 1 : p]], 1)  # (1, P+1, D)
            tok = torch.tensor([ext[1 : p + 1] + [d1]])
            out = model.mtp_forward(0, hid, tok, torch.arange(p + 1).unsqueeze(0))
            a += int(int(model.mtp[0].logits(out[0, -1]).argmax()) == ext[p + 2])
        for j in range(a):
            accepted[j] += 1
        produced += a + 1
        p += a + 1
    return accepted


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_drafts_are_exact_after_partial_acceptance(trained, attn_impl):
    """The MTP caches hold verified states: every draft equals an uncached recomputation."""
    model = _engine(trained, attn_impl).model
    prompts = _prompts()
    n_out = 16
    for k in (1, 2):
        out = generate_speculative(model, prompts, SamplingParams(n_out, 0.0, 1.0, None, ()), k)
        with torch.no_grad():
            want = [_simulated_accepts(model, p, n_out, k) for p in prompts]
        assert [r["accepted"] for r in out.stats["mtp_rows"]] == want, k


def test_two_mtp_modules_keep_the_training_positions(tmp_path):
    """With D = 2 modules, each module's cache entry for chain start t sits at position t, as in training
    (``mtp_depth_losses``: positions 0..n-1 per depth): after speculative steps, every entry built only
    from verified tokens equals an uncached training-style forward, for both modules; greedy output
    equals plain decoding."""
    path = make_checkpoint(tmp_path / "d2", seed=5, mtp=2, vocab_size=VOCAB)
    model = dsv3.load(path, dtype="float32", progress=False).model
    assert len(model.mtp) == 2
    prompt = [0, 3, 5, 7, 9, 11, 13]
    greedy = RowSampler(torch.zeros(1), torch.ones(1), [None], None)
    with torch.inference_mode():
        spec = SpecDecoder(model, model.new_cache(1, 48), 2)
        first = spec.prefill([0], [prompt]).argmax(-1)
        pos = torch.tensor([len(prompt)])
        spec.put([0], pos, first)
        seq = prompt + [int(first)]
        for _ in range(6):
            n_acc, bonus, drafts = spec.step([0], pos, greedy)
            a = int(n_acc)
            seq += drafts[0, :a].tolist() + [int(bonus)]
            pos += a + 1
        n_new = len(seq) - len(prompt)
        assert seq == prompt + generate(model, [prompt], SamplingParams(n_new, eos_ids=())).token_ids[0]
        # training-style: full sequences, no chain shift in positions, a fresh cache
        tokens = torch.tensor([seq])
        fresh = model.new_cache(1, 48)
        c = model(tokens)
        for layer in range(2):
            n = tokens.shape[1] - 1 - layer
            c = model.mtp_forward(layer, c[:, :n], tokens[:, layer + 1 :], torch.arange(n).unsqueeze(0), fresh)
            verified = int(pos) - layer - 1  # chain starts whose tokens t+1 .. t+layer+1 are all verified
            for name, got in spec.cache.entries(spec.cache.mtp[layer]).items():
                want = fresh.entries(fresh.mtp[layer])[name]
                err = float((got[0, :verified] - want[0, :verified]).abs().max())
                assert err <= 1e-5 * float(want[0, :verified].abs().max()), (layer, name, err)
