"""Shapes, parameter counts and module names of the LLaMA-style model and its presets."""

from __future__ import annotations

import pytest
import torch

from llmvalley.models import PRESETS, Llama, LlamaConfig, build_model, model_config
from llmvalley.models.llama import apply_rotary, rotary_tables

# Exact parameter counts; the GaLore paper sizes match its repository's configs
# (58.07M, 134.11M, 367.97M, 1339.08M).
EXPECTED_PARAMS = {
    "nano": 918_656,
    "micro": 4_877_568,
    "tiny": 19_241_472,
    "llama-60m": 58_073_600,
    "llama-130m": 134_105_856,
    "llama-350m": 367_969_280,
    "llama-1b": 1_339_082_752,
    "gpt2-124m": 162_148_608,
}
PAPER_SHAPES = {  # d_model, n_layers, n_heads, ffn_hidden
    "llama-60m": (512, 8, 8, 1376),
    "llama-130m": (768, 12, 12, 2048),
    "llama-350m": (1024, 24, 16, 2736),
    "llama-1b": (2048, 24, 32, 5461),
}


def count(cfg: LlamaConfig) -> int:
    """Closed-form parameter count of the architecture."""
    d, f, v = cfg.d_model, cfg.ffn_hidden, cfg.vocab_size
    per_layer = 4 * d * d + 3 * d * f + 2 * d
    return 2 * v * d + cfg.n_layers * per_layer + d


def test_every_preset_is_covered() -> None:
    assert set(PRESETS) == set(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_preset_parameter_counts_on_meta_device(name: str) -> None:
    model = build_model(PRESETS[name], "meta")
    assert model.num_parameters() == EXPECTED_PARAMS[name] == count(PRESETS[name])
    assert model.lm_head.weight.shape == (PRESETS[name].vocab_size, PRESETS[name].d_model)


def test_cpu_presets_sizes_and_paper_configs() -> None:
    assert 0.8e6 < EXPECTED_PARAMS["nano"] < 1.2e6
    assert 4e6 < EXPECTED_PARAMS["micro"] < 6e6
    assert 17e6 < EXPECTED_PARAMS["tiny"] < 23e6
    for name, (d, layers, heads, ffn) in PAPER_SHAPES.items():
        cfg = PRESETS[name]
        assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.ffn_hidden) == (d, layers, heads, ffn)
        assert cfg.vocab_size == 32000 and cfg.max_seq_len == 256
    gpt2 = PRESETS["gpt2-124m"]
    assert (gpt2.d_model, gpt2.n_layers, gpt2.n_heads, gpt2.vocab_size, gpt2.max_seq_len) == (
        768, 12, 12, 50257, 1024)
    # without the untied head it is GPT-2 small's 124M
    assert abs(EXPECTED_PARAMS["gpt2-124m"] - 50257 * 768 - 124e6) < 1e6


def test_module_names_the_router_recognises() -> None:
    model = build_model(PRESETS["nano"], "meta")
    names = dict(model.named_modules())
    assert isinstance(names["embed_tokens"], torch.nn.Embedding)
    assert isinstance(names["lm_head"], torch.nn.Linear)
    assert model.lm_head.weight is not model.embed_tokens.weight  # untied
    norms = [n for n, m in names.items() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * 4 + 1 and all("norm" in n for n in norms)
    assert all(p.dim() == 1 for n, p in model.named_parameters() if "norm" in n)
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())


def test_forward_shapes_and_initial_loss() -> None:
    torch.manual_seed(0)
    model = Llama(model_config("nano", d_model=32, n_layers=2, n_heads=2, ffn_hidden=64))
    idx = torch.randint(0, 256, (3, 17))
    assert model(idx).shape == (3, 17, 256)
    loss = model(idx, idx)
    assert loss.dim() == 0 and abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.2


def test_attention_is_causal() -> None:
    torch.manual_seed(0)
    model = Llama(model_config("nano", d_model=32, n_layers=2, n_heads=2, ffn_hidden=64)).eval()
    idx = torch.randint(0, 256, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_sequence_longer_than_context_is_rejected() -> None:
    model = Llama(model_config("nano", d_model=32, n_layers=1, n_heads=2, ffn_hidden=64,
                               max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_rotary_preserves_norms_and_is_relative() -> None:
    cos, sin = rotary_tables(16, 32, 10000.0)
    q = torch.randn(1, 1, 32, 16)
    rq = apply_rotary(q, cos, sin)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    same = q[:, :, :1].expand(1, 1, 32, 16)  # one vector at every position
    r = apply_rotary(same, cos, sin)
    dots = (r[0, 0, 5] @ r[0, 0, 3], r[0, 0, 12] @ r[0, 0, 10])  # both 2 positions apart
    assert torch.allclose(dots[0], dots[1], atol=1e-4)


@pytest.mark.parametrize("overrides, message", [
    ({"d_model": 30, "n_heads": 4}, "divisible"),
    ({"d_model": 36, "n_heads": 4}, "even"),
    ({"n_layers": 0}, "positive"),
])
def test_bad_shapes(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model_config("nano", **overrides)


def test_unknown_preset() -> None:
    with pytest.raises(KeyError):
        model_config("huge")
