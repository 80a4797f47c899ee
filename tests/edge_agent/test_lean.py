"""The lean runtime against transformers and peft, on the tiny Llama: the same logits, the same
adapters under the same names, the same loss and gradients; int8 close to fp32; and an agent's
training round that never imports transformers, peft or quanto."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compression.protocol import TrainableSpec
from edge_agent import lean, modelcache
from edge_agent.data import Record, build_blocks
from edge_agent.errors import ModelError
from edge_agent.model import attach_trainable, get_trainable, load_base, set_trainable
from edge_agent.train import lm_loss, set_gradient_checkpointing

ROOT = Path(__file__).resolve().parents[2]


def _spec(targets: tuple[str, ...] = ("q_proj", "v_proj")) -> TrainableSpec:
    return TrainableSpec(r=4, alpha=8, targets=targets)


def _pair(tiny_model: Path, tmp_path: Path, quantize: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    hf, _tok = load_base(str(tiny_model), "none")
    lean.write_lean(hf, tmp_path, quantize=quantize)
    return hf, lean.load_lean(tmp_path)


def test_lean_fp32_gives_transformers_logits(tiny_model: Path, tmp_path: Path) -> None:
    hf, lm = _pair(tiny_model, tmp_path, quantize=False)
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = lm(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_lean_follows_the_config_rope_theta_and_grouped_query_attention(tmp_path: Path) -> None:
    """SmolLM2's shape: RoPE theta 100000 (kept in rope_parameters by newer transformers), 3 KV heads for 9."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300, hidden_size=144, intermediate_size=256, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )  # fmt: skip
    hf = LlamaForCausalLM(cfg).eval()
    lean.write_lean(hf, tmp_path, quantize=False)
    lm = lean.load_lean(tmp_path)
    assert lm.config.rope_theta == 100000.0 and lm.config.num_key_value_heads == 3
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")])
def test_lean_lora_has_peft_names_and_gives_its_loss_and_gradients(tiny_model: Path, tmp_path: Path, targets: tuple[str, ...]) -> None:
    hf, lm = _pair(tiny_model, tmp_path, quantize=False)
    spec = _spec(targets)
    peft_model = attach_trainable(hf, spec, "lora")
    lm = attach_trainable(lm, spec, "lora")
    state = get_trainable(peft_model)
    assert set(get_trainable(lm)) == set(state) and len(state) == 2 * 2 * len(targets)
    rng = np.random.default_rng(1)
    shared = {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in state.items()}
    set_trainable(peft_model, shared)
    set_trainable(lm, shared)
    assert all(np.array_equal(get_trainable(lm)[k], shared[k]) for k in shared)
    batch = rng.integers(0, hf.config.vocab_size, (2, 32))
    for checkpointing, chunk in ((False, 0), (True, 16)):
        losses, grads = [], []
        for m in (peft_model, lm):
            set_gradient_checkpointing(m, checkpointing)
            m.train()
            loss = lm_loss(m, batch, chunk)
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append(_grads(m))
        assert abs(losses[0] - losses[1]) < 1e-4
        assert set(grads[0]) == set(grads[1]) == set(shared)
        for name, g in grads[0].items():
            np.testing.assert_allclose(grads[1][name], g, rtol=1e-3, atol=1e-6, err_msg=name)
        for m in (peft_model, lm):
            m.zero_grad(set_to_none=True)


def _grads(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Each adapter's gradient, under its peft state-dict name."""
    if isinstance(model, lean.LeanCausalLM):
        return {k: p.grad.numpy().copy() for k, p in model.lora_names.items() if p.grad is not None}
    return {n.replace(".default", ""): p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}


def test_only_adapters_train_in_the_lean_model(tiny_model: Path, tmp_path: Path) -> None:
    _, lm = _pair(tiny_model, tmp_path, quantize=True)
    lm = attach_trainable(lm, _spec(), "lora")
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora." in n for n in trainable)
    with pytest.raises(ModelError, match="lean runtime trains LoRA"):
        attach_trainable(lean.load_lean(tmp_path), TrainableSpec(r=4, alpha=8, targets=("q_proj",), embedding=True), "lora")


def test_int8_lean_stays_close_to_fp32(tiny_model: Path, tmp_path: Path) -> None:
    hf, _ = load_base(str(tiny_model), "none")
    (tmp_path / "fp32").mkdir()
    (tmp_path / "int8").mkdir()
    lean.write_lean(hf, tmp_path / "fp32", quantize=False)
    lean.write_lean(hf, tmp_path / "int8", quantize=True)
    ids = torch.randint(0, hf.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    fp32, int8 = lean.load_lean(tmp_path / "fp32"), lean.load_lean(tmp_path / "int8")
    with torch.no_grad():
        loss_a, loss_b = float(fp32(input_ids=ids, labels=ids).loss), float(int8(input_ids=ids, labels=ids).loss)
        agree = (fp32(input_ids=ids).logits.argmax(-1) == int8(input_ids=ids).logits.argmax(-1)).float().mean()
    assert abs(loss_a - loss_b) / loss_a < 0.005
    assert agree > 0.95


def test_the_fused_int8_head_loss_is_the_cross_entropy_of_its_logits_with_the_same_gradient() -> None:
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(lean.HEAD_BLOCK + 300, 64, generator=gen)  # more than one vocabulary block
    q, scale = lean.quantize_groups(table)
    assert scale.shape == (table.shape[0], 64 // lean.EMBED_GROUP)
    head = lean.Head(lean.Embedding(q, scale))
    h = torch.randn(40, 64, generator=gen, requires_grad=True)
    y = torch.randint(0, table.shape[0], (40,), generator=gen)
    y[0] = table.shape[0] - 1  # a target in the last, partial block
    fused = head.loss_sum(h, y)
    (g_fused,) = torch.autograd.grad(fused, h)
    full = torch.nn.functional.cross_entropy(head(h), y, reduction="sum")
    (g_full,) = torch.autograd.grad(full, h)
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_fused, g_full, rtol=1e-4, atol=1e-5)
    dense = lean._dequant(q, scale)
    assert float((dense - table).abs().max()) <= float(table.abs().max()) / 127  # within one step of its group's scale


def test_damaged_lean_files_are_refused_with_a_model_error_naming_the_cache(tiny_model: Path, tmp_path: Path) -> None:
    hf, _ = load_base(str(tiny_model), "none")
    lean.write_lean(hf, tmp_path)
    weights, config = tmp_path / lean.LEAN_WEIGHTS, tmp_path / lean.LEAN_CONFIG
    good_w, good_c = weights.read_bytes(), config.read_text()
    weights.write_bytes(good_w[: len(good_w) // 2])  # truncated (a kill -9 would never leave this: the cache is renamed complete)
    with pytest.raises(ModelError, match="unreadable"):
        lean.load_lean(tmp_path)
    weights.write_bytes(good_w)
    raw = json.loads(good_c)
    config.write_text(json.dumps({**raw, "hidden_size": raw["hidden_size"] * 2, "head_dim": None}))  # tensors of other shapes
    with pytest.raises(ModelError, match="another shape or type"):
        lean.load_lean(tmp_path)
    for bad in ("[1, 2]", json.dumps({k: v for k, v in raw.items() if k != "num_attention_heads"}), "not json"):
        config.write_text(bad)
        with pytest.raises(ModelError):
            lean.load_lean(tmp_path)
    config.write_text(good_c)
    lean.load_lean(tmp_path)  # and the intact files load


def test_the_cache_holds_lean_weights_and_auto_loads_them_with_the_same_tokens(tiny_model: Path, tmp_path: Path) -> None:
    path = modelcache.ensure(str(tiny_model), tmp_path / "cache", in_subprocess=False)
    assert (path / lean.LEAN_WEIGHTS).is_file() and (path / lean.LEAN_CONFIG).is_file()
    lm, tok = load_base(str(tiny_model), "int8", tmp_path / "cache", runtime="auto")
    hf, hf_tok = load_base(str(tiny_model), "int8", tmp_path / "cache", runtime="transformers")
    assert isinstance(lm, lean.LeanCausalLM) and not isinstance(hf, lean.LeanCausalLM)
    text = "def parse(path):\n    with open(path) as fh:\n        return json.load(fh)\n"
    assert tok(text)["input_ids"] == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id == hf_tok.eos_token_id
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for upto, prompt in ((3, False), (2, True)):
        assert tok.apply_chat_template(chat[:upto], add_generation_prompt=prompt) == hf_tok.apply_chat_template(
            chat[:upto], tokenize=False, add_generation_prompt=prompt
        )
    # Chat and completion records cut into the same blocks, and the lean model's masked loss is transformers'.
    records = [Record("chat", messages=tuple((m["role"], m["content"]) for m in chat))] * 6 + [
        Record("completion", prompt="def f(x):", completion="\n    return x\n")
    ] * 6
    blocks, hf_blocks = build_blocks(records, tok, 16, 0.2, 0), build_blocks(records, hf_tok, 16, 0.2, 0)
    np.testing.assert_array_equal(blocks.train, hf_blocks.train)
    assert (blocks.train < 0).any() and (blocks.train >= 0).any()
    with torch.no_grad():
        torch.testing.assert_close(lm_loss(lm, blocks.train, 8), lm_loss(hf, blocks.train), rtol=2e-4, atol=2e-4)
    with pytest.raises(ModelError, match="needs model.quantize = 'int8'"):
        load_base(str(tiny_model), "none", runtime="lean")


def test_a_lean_training_round_imports_neither_transformers_nor_peft_nor_quanto(tiny_model: Path, tmp_path: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    modelcache.ensure(str(tiny_model), tmp_path / "cache", in_subprocess=False)
    data = device_data(0)
    script = f"""
import json, sys
import numpy as np
from compression.protocol import TrainableSpec
from edge_agent.config import TrainConfig
from edge_agent.data import build_blocks, read_texts
from edge_agent.model import attach_trainable, get_trainable, load_base, round_delta
from edge_agent.train import evaluate, train_round
model, tok = load_base({str(tiny_model)!r}, "int8", {str(tmp_path / "cache")!r}, runtime="lean")
blocks = build_blocks(read_texts({str(data)!r}), tok, 32, 0.1, 0)
model = attach_trainable(model, TrainableSpec(r=4, alpha=8, targets=("q_proj", "v_proj")), "lora")
start = get_trainable(model)
before = evaluate(model, blocks, 4, 4, 16)
cfg = TrainConfig(batch_size=4, seq_len=32, local_steps=3, lr=1e-2, loss_chunk_tokens=16)
result = train_round(model, blocks, cfg, np.random.default_rng(0))
delta = round_delta(model, start, "lora")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "peft", "optimum"))
print(json.dumps({{"heavy": heavy, "steps": result.steps, "loss": result.train_loss, "before": before,
                  "moved": float(sum(np.abs(v).sum() for v in delta.values()))}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["heavy"] == [], doc["heavy"]
    assert doc["steps"] == 3 and np.isfinite(doc["loss"]) and doc["moved"] > 0


def test_int8_linears_sharing_one_scratch_buffer_give_the_dense_outputs_and_gradients() -> None:
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(48, 32, generator=gen), torch.randn(32, 48, generator=gen), torch.randn(80, 32, generator=gen)]
    quantized = [lean.quantize_rows(w) for w in weights]
    x = torch.randn(2, 5, 32, generator=gen, requires_grad=True)
    h = x
    for q, scale in quantized:  # each layer reuses (and overwrites) the buffer the one before used
        h = torch.tanh(lean._Int8Linear.apply(h, q, scale))
    (gx,) = torch.autograd.grad(h.square().sum(), x)
    xd = x.detach().clone().requires_grad_(True)
    hd = xd
    for q, scale in quantized:
        hd = torch.tanh(torch.nn.functional.linear(hd, q.to(torch.float32) * scale[:, None]))
    (gd,) = torch.autograd.grad(hd.square().sum(), xd)
    # fp32 rounding differs (the scale multiplies the output, not the weight); a clobbered buffer would be off by O(1)
    torch.testing.assert_close(h, hd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, gd, rtol=1e-3, atol=1e-3)
