"""Hugging Face transformers models (tiny configs, no download) on the fast path, exact against the float64 loop."""

from __future__ import annotations

import pytest
import torch
from fastpath_compare import compare
from torch import nn

transformers = pytest.importorskip("transformers")

N = 6
T = 8


def _lm_loss(out, y):
    return nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))


def _cls_loss(out, y):
    return nn.functional.cross_entropy(out.logits, y)


def _tokens(vocab, seed=1):
    return torch.randint(0, vocab, (N, T), generator=torch.Generator().manual_seed(seed))


def test_gpt2_lm_head_tied_conv1d_position_embeddings():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval().double()
    x = _tokens(40)
    got = compare(model, x, _tokens(40, seed=2), _lm_loss)
    assert got.capture_paths["transformer.h.0.attn.c_attn"] == "moment-rule"
    assert got.capture_paths["transformer.wpe"] == "moment-rule"
    assert got.capture_paths["lm_head"] == "grad-sampler"  # tied with transformer.wte


def test_gpt2_tied_head_in_small_blocks_is_exact():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval().double()
    compare(model, _tokens(40), _tokens(40, seed=2), _lm_loss, max_memory_mb=0.02)  # a few samples per block


def test_bert_classifier_position_embeddings_from_one_row_of_ids():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=40,
        max_position_embeddings=16,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(cfg).eval().double()
    y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(3))
    got = compare(model, _tokens(40), y, _cls_loss)
    assert got.capture_paths["bert.embeddings.position_embeddings"] == "moment-rule"


def test_vit_cls_token_and_position_embeddings_parameters():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=8,
        num_channels=3,
        num_labels=3,
    )
    model = transformers.ViTForImageClassification(cfg).eval().double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(N, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    got = compare(model, x, y, _cls_loss)
    assert got.capture_paths["vit.embeddings"] == "grad-sampler"


def test_distilbert_classifier():
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(
        vocab_size=40, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16, num_labels=3
    )
    model = transformers.DistilBertForSequenceClassification(cfg).eval().double()
    y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(3))
    compare(model, _tokens(40), y, _cls_loss)
