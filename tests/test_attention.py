import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from dladiff.diffusion.attention import AttentionStore, attention_loss, install_capture, layer_resolution


@pytest.fixture(scope="module")
def unet(tiny_sd):
    return UNet2DConditionModel.from_pretrained(tiny_sd / "unet").eval()


def _inputs(unet, batch=2):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor([10, 500]), text


def test_layer_resolution_by_name():
    assert layer_resolution("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor", 64, 4) == 64
    assert layer_resolution("down_blocks.2.attentions.1.transformer_blocks.0.attn2.processor", 64, 4) == 16
    assert layer_resolution("mid_block.attentions.0.transformer_blocks.0.attn1.processor", 64, 4) == 8
    assert layer_resolution("up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", 64, 4) == 16
    assert layer_resolution("up_blocks.3.attentions.2.transformer_blocks.0.attn1.processor", 64, 4) == 64


def test_capturing_processor_matches_stock_and_maps_have_shapes(unet):
    sample, t, text = _inputs(unet)
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        stock = unet(sample, t, encoder_hidden_states=text).sample
    store = AttentionStore()
    names = install_capture(unet, store, (8,), latent_side=8)
    with torch.no_grad():
        captured = unet(sample, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(captured, stock, atol=1e-5, rtol=1e-4)
    assert names and all(layer_resolution(n, 8, 2) == 8 for n in names)
    for name, maps in store.self_.items():
        heads = unet.get_submodule(name.rsplit(".", 1)[0]).heads
        assert maps.shape == (2, heads, 64, 64)
        torch.testing.assert_close(maps.sum(-1), torch.ones_like(maps.sum(-1)))
    for maps in store.cross.values():
        assert maps.shape[0] == 2 and maps.shape[2:] == (64, 77)
    layers_at_4 = [n for n in unet.attn_processors if layer_resolution(n, 8, 2) == 4]
    assert all(isinstance(unet.attn_processors[n], AttnProcessor2_0) for n in layers_at_4)  # fused elsewhere


def test_token_restriction_and_disabled_store(unet):
    sample, t, text = _inputs(unet)
    store = AttentionStore()
    install_capture(unet, store, (4, 8), latent_side=8, tokens=[5])
    with torch.no_grad():
        unet(sample, t, encoder_hidden_states=text)
    assert all(m.shape[-1] == 1 for m in store.cross.values())
    store.clear()
    store.enabled = False
    with torch.no_grad():
        unet(sample, t, encoder_hidden_states=text)
    assert not store.cross and not store.self_


def reference_maps(unet, sample, t, text, names):
    """softmax(QKᵀ·scale) of the layers ``names``, computed by hand from each layer's own inputs."""
    maps, hooks = {}, []

    def hook(name):
        def record(attn, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            context = hidden if context is None else context
            q, k = attn.to_q(hidden), attn.to_k(context)
            split = lambda x: x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)
            maps[name] = torch.softmax(split(q) @ split(k).transpose(-1, -2) * attn.scale, dim=-1)
        return record

    for name in names:
        module = unet.get_submodule(name.rsplit(".", 1)[0])
        hooks.append(module.register_forward_pre_hook(hook(name), with_kwargs=True))
    try:
        with torch.no_grad():
            unet(sample, t, encoder_hidden_states=text)
    finally:
        for h in hooks:
            h.remove()
    return maps


def count_sdpa(monkeypatch):
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def check_capture_under_sdpa(unet, sample, t, text, monkeypatch, atol=1e-6):
    """Captured maps = hand-computed attention; uncaptured layers (and all, while disabled) run fused SDPA."""
    store = AttentionStore()
    names = install_capture(unet, store, (8,), latent_side=8)
    expected = reference_maps(unet, sample, t, text, names)
    calls = count_sdpa(monkeypatch)
    with torch.no_grad():
        unet(sample, t, encoder_hidden_states=text)
    assert len(calls) == len(unet.attn_processors) - len(names) > 0
    assert set(store.cross) | set(store.self_) == set(names)
    for name in names:
        got = store.cross.get(name, store.self_.get(name))
        torch.testing.assert_close(got.float(), expected[name].float(), atol=atol, rtol=1e-3)
    calls.clear()
    store.enabled = False
    with torch.no_grad():
        unet(sample, t, encoder_hidden_states=text)
    assert len(calls) == len(unet.attn_processors)


def test_captured_maps_are_the_attention_and_other_layers_stay_fused(unet, monkeypatch):
    check_capture_under_sdpa(unet, *_inputs(unet), monkeypatch)


def test_unknown_resolution_is_an_error(unet):
    with pytest.raises(ValueError, match="no attention layer"):
        install_capture(unet, AttentionStore(), (32,), latent_side=8)


def test_attention_loss_zero_for_equal_maps():
    a = AttentionStore(cross={"l": torch.rand(1, 2, 4, 3)}, self_={"l": torch.rand(1, 2, 4, 4)})
    b = AttentionStore(cross={"l": a.cross["l"].clone()}, self_={"l": a.self_["l"].clone()})
    assert attention_loss(a, b, 1.0, 1.0) == 0
    b.self_["l"] += 0.5
    assert attention_loss(a, b, 1.0, 2.0) == pytest.approx(0.5)
