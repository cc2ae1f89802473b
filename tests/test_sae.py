"""Sparse autoencoders: files in SAELens's and dictionary_learning's formats (written here by hand, not by our
own saver), encode/decode against hand computations of each architecture, features per token against encoding
the trace's residuals by hand, steer_feature moving the residual by exactly amount * W_dec[f] at its layer and
nowhere before it, the token inspector's feature panel, and clear errors for what cannot work. The shipped SAE
(trained by scripts/train_sae.py on gpt-oss-nano's residual stream) is checked to load, to stay small, and to
have the digit feature its notes name fire on the digits of a text it never saw."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import workbench as wb
from workbench import fixtures
from workbench.analysis.sae import FIXTURES, SAE, features, hook_layer, load_sae
from workbench.errors import InterventionError, SAEError
from workbench.inspect import capture as tracing

D_IN, D_SAE = 64, 96  # the tiny gpt-oss's residual stream; a small dictionary
TEXT = "hello world, how are you today? 12 34"


@pytest.fixture(scope="module")
def gpt_oss():
    return wb.load(str(fixtures.tiny_checkpoint("gpt_oss")), preset="cpu")


def weights(seed=0, d_in=D_IN, d_sae=D_SAE):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.3, "b_enc": torch.randn(d_sae, generator=g) * 0.1,
            "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.2, "b_dec": torch.randn(d_in, generator=g) * 0.1,
            "threshold": torch.rand(d_sae, generator=g) * 0.5}


def write_saelens(folder, cfg, w):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(folder / "sae_weights.safetensors"))
    return folder


def saelens_cfg(architecture, hook="blocks.1.hook_resid_post", **extra):
    """A cfg.json as SAELens 6 writes it (hook name inside metadata)."""
    return {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"hook_name": hook, "model_name": "tiny", "sae_lens_version": "6.54.12"}, **extra}


# ---- hand computations -----------------------------------------------------------------------------------

def pre_by_hand(x, w, apply_b_dec=True):
    centred = x.double() - (w["b_dec"].double() if apply_b_dec else 0)
    return torch.einsum("ti,if->tf", centred, w["W_enc"].double()) + w["b_enc"].double()


def relu_by_hand(pre):
    return torch.where(pre > 0, pre, torch.zeros_like(pre))


def topk_by_hand(pre, k):
    order = pre.argsort(dim=-1, descending=True)[:, :k]
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter(1, order, True)
    return torch.where(keep & (pre > 0), pre, torch.zeros_like(pre))


def jumprelu_by_hand(pre, threshold):
    return torch.where((pre > threshold.double()) & (pre > 0), pre, torch.zeros_like(pre))


@pytest.mark.parametrize("architecture", ["standard", "topk", "topk-rescaled", "jumprelu"])
def test_encode_and_decode_equal_hand_computation(tmp_path, architecture):
    w = weights()
    extra = {"k": 7} if architecture.startswith("topk") else {}
    if architecture == "topk-rescaled":
        extra["rescale_acts_by_decoder_norm"] = True
    arch = architecture.removesuffix("-rescaled")
    stored = {k: v for k, v in w.items() if k != "threshold" or arch == "jumprelu"}
    sae = load_sae(write_saelens(tmp_path / architecture, saelens_cfg(arch, **extra), stored))
    assert (sae.architecture, sae.layer, sae.d_in, sae.d_sae) == (arch, 1, D_IN, D_SAE)
    x = torch.randn(20, D_IN, generator=torch.Generator().manual_seed(1)) * 2
    pre = pre_by_hand(x, w)
    norms = w["W_dec"].double().norm(dim=1)
    if architecture == "standard":
        expected = relu_by_hand(pre)
    elif architecture == "topk":
        expected = topk_by_hand(pre, 7)
    elif architecture == "topk-rescaled":
        expected = topk_by_hand(pre * norms, 7)
    else:
        expected = jumprelu_by_hand(pre, w["threshold"])
    f = sae.encode(x)
    assert f.dtype == torch.float32 and torch.allclose(f.double(), expected, atol=1e-5)
    assert torch.equal(f > 0, expected > 0)
    if architecture.startswith("topk"):
        assert int((f > 0).sum(-1).max()) <= 7
    decoded = (expected / norms if architecture == "topk-rescaled" else expected) @ w["W_dec"].double() \
        + w["b_dec"].double()
    assert torch.allclose(sae.decode(f).double(), decoded, atol=1e-5)


def test_round_trip_save_and_load(tmp_path):
    w = weights(seed=3)
    for arch, extra in (("standard", {}), ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
                        ("jumprelu", {"threshold": w["threshold"]})):
        sae = SAE(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], arch, 2, "blocks.2.hook_resid_post",
                  apply_b_dec_to_input=False, metadata={"note": "x"}, **extra)
        back = load_sae(sae.save(tmp_path / arch))
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(back, name), getattr(sae, name))
        assert (back.architecture, back.layer, back.hook_name, back.k, back.apply_b_dec_to_input,
                back.rescale_acts_by_decoder_norm, back.metadata["note"]) == \
            (arch, 2, "blocks.2.hook_resid_post", sae.k, False, sae.rescale_acts_by_decoder_norm, "x")
        assert (back.threshold is None) == (arch != "jumprelu")
        x = torch.randn(4, D_IN)
        assert torch.equal(back.encode(x), sae.encode(x))


def test_old_saelens_configs_and_batchtopk_checkpoints(tmp_path):
    w = weights(seed=4)
    base = {k: v for k, v in w.items() if k != "threshold"}
    old = {"d_in": D_IN, "d_sae": D_SAE, "hook_point": "blocks.3.hook_resid_pre", "hook_layer": 3,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": False,
           "normalize_activations": False}  # a pre-6.0 SAELens cfg.json
    sae = load_sae(write_saelens(tmp_path / "old", old, base))
    assert (sae.architecture, sae.k, sae.layer, sae.apply_b_dec_to_input) == ("topk", 4, 2, False)  # resid_pre 3
    x = torch.randn(6, D_IN)
    assert torch.allclose(sae.encode(x).double(), topk_by_hand(pre_by_hand(x, w, apply_b_dec=False), 4), atol=1e-5)
    batchtopk = write_saelens(tmp_path / "btk", saelens_cfg("batchtopk", k=4), {**base,
                                                                               "topk_threshold": torch.tensor(0.3)})
    sae = load_sae(batchtopk)
    assert sae.architecture == "jumprelu" and torch.equal(sae.threshold, torch.full((D_SAE,), 0.3))
    assert torch.allclose(sae.encode(x).double(), jumprelu_by_hand(pre_by_hand(x, w), sae.threshold), atol=1e-5)


def test_dictionary_learning_batchtopk_as_published_for_gpt_oss_20b(tmp_path):
    """andyrdt/saes-gpt-oss-20b's layout: resid_post_layer_L/trainer_N/{config.json, ae.pt}, BatchTopKSAE."""
    folder = tmp_path / "resid_post_layer_11" / "trainer_0"
    folder.mkdir(parents=True)
    w = weights(seed=5)
    state = {"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"],
             "decoder.weight": w["W_dec"].T.contiguous(), "b_dec": w["b_dec"], "threshold": torch.tensor(0.25),
             "k": torch.tensor(8)}
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({
        "trainer": {"dict_class": "BatchTopKSAE", "trainer_class": "BatchTopKTrainer", "activation_dim": D_IN,
                    "dict_size": D_SAE, "k": 8, "layer": 11, "lm_name": "openai/gpt-oss-20b"},
        "buffer": {"ctx_len": 1024}}))
    sae = load_sae(folder)
    assert (sae.architecture, sae.layer, sae.hook_name) == ("jumprelu", 11, "blocks.11.hook_resid_post")
    x = torch.randn(9, D_IN) * 2
    # dictionary_learning's BatchTopKSAE.encode at inference: relu(encoder(x - b_dec)), kept where > threshold
    post_relu = torch.relu((x - state["b_dec"]) @ state["encoder.weight"].T + state["encoder.bias"])
    expected = post_relu * (post_relu > state["threshold"])
    assert torch.allclose(sae.encode(x), expected, atol=1e-5)
    assert torch.allclose(sae.decode(expected), expected @ state["decoder.weight"].T + state["b_dec"], atol=1e-5)


def test_hook_names_map_to_the_layer_whose_output_they_read():
    assert hook_layer("blocks.7.hook_resid_post") == 7
    assert hook_layer("blocks.7.hook_resid_pre") == 6
    assert hook_layer("model.layers.3") == 3
    assert hook_layer("resid_post_layer_23/trainer_0") == 23
    with pytest.raises(SAEError, match="embeddings"):
        hook_layer("blocks.0.hook_resid_pre")
    with pytest.raises(SAEError, match="layer=L"):
        hook_layer("blocks.3.hook_mlp_out")


# ---- with a model ----------------------------------------------------------------------------------------

def tiny_sae(tmp_path, architecture="topk", layer=1, **extra):
    w = weights(seed=6)
    stored = {k: v for k, v in w.items() if k != "threshold" or architecture == "jumprelu"}
    if architecture == "topk":
        extra = {"k": 6, **extra}
    cfg = saelens_cfg(architecture, hook=f"blocks.{layer}.hook_resid_post", **extra)
    return load_sae(write_saelens(tmp_path / f"{architecture}-{layer}", cfg, stored))


def test_features_per_token_equal_encoding_the_residuals(gpt_oss, tmp_path):
    sae = tiny_sae(tmp_path)
    t = gpt_oss.trace(TEXT, what=["residuals"], layers=[sae.layer], dtype=torch.float32)
    feats = t.features(sae, k=4)
    by_hand = sae.encode(t.residual(1))
    top = by_hand.topk(4, dim=-1)
    assert torch.equal(feats.indices, top.indices) and torch.equal(feats.values, top.values)
    assert feats.tokens == t.tokens.strings and feats.layer == 1
    assert torch.equal(features(t, sae, 4).indices, sae.features(t, 4).indices)
    for i in range(len(t.tokens)):
        active = [(f, v) for f, v in zip(top.indices[i].tolist(), top.values[i].tolist()) if v > 0]
        assert feats.at(i) == active
    f0, _ = feats.at(0)[0]
    assert all(f0 in feats.indices[p].tolist() for p, _ in feats.where(f0))
    assert "SAE features" in feats._repr_html_() and "<b>" in feats._repr_html_()
    with pytest.raises(SAEError, match="out of range"):
        feats.at(len(t.tokens))


def test_steer_feature_moves_the_residual_by_exactly_amount_times_the_decoder_row(gpt_oss, tmp_path):
    sae = tiny_sae(tmp_path, layer=2)
    outside = gpt_oss.trace(TEXT, what=["residuals"], dtype=torch.float32)
    with gpt_oss.steer_feature(sae, 5, 3.5):
        inside = gpt_oss.trace(TEXT, what=["residuals"], dtype=torch.float32)
    moved = inside.residual(2) - outside.residual(2)
    expected = (3.5 * sae.W_dec[5]).expand_as(moved)
    assert torch.allclose(moved, expected, atol=1e-5, rtol=0)
    for layer in (0, 1):  # before the SAE's layer: untouched
        assert torch.equal(inside.residual(layer), outside.residual(layer))
    after = gpt_oss.trace(TEXT, what=["residuals"], dtype=torch.float32)
    assert torch.equal(after.residual(3), outside.residual(3))  # undone on exit


def test_bad_input_says_what_to_do(gpt_oss, tmp_path):
    wide = load_sae(write_saelens(tmp_path / "wide", {**saelens_cfg("standard"), "d_in": 32, "d_sae": 8},
                                  {k: v for k, v in weights(d_in=32, d_sae=8).items() if k != "threshold"}))
    t = gpt_oss.trace(TEXT, what=["residuals"], layers=[1])
    with pytest.raises(SAEError, match="d_in=32"):
        t.features(wide)
    with pytest.raises(SAEError, match="d_in=32"):
        gpt_oss.steer_feature(wide, 0, 1.0)
    sae = tiny_sae(tmp_path)
    with pytest.raises(SAEError, match="trace with what=\\['blocks.1.resid_post'\\]"):
        gpt_oss.trace(TEXT, what=["routing"]).features(sae)
    with pytest.raises(SAEError, match="trace with what=\\['blocks.1.resid_post'\\].*residuals has layers 0"):
        gpt_oss.trace(TEXT, what=["residuals"], layers=[0]).features(sae)
    by_point = gpt_oss.trace(TEXT, what=[sae.point]).features(sae)   # the point and the group read the same tensor
    by_group = gpt_oss.trace(TEXT, what=["residuals"], layers=[1]).features(sae)
    assert torch.equal(by_point.indices, by_group.indices) and torch.equal(by_point.values, by_group.values)
    with pytest.raises(SAEError, match="features 0..95"):
        gpt_oss.steer_feature(sae, 96, 1.0)
    with pytest.raises(SAEError, match="amount"):
        gpt_oss.steer_feature(sae, 1, "a lot")
    deep = tiny_sae(tmp_path, layer=9)
    with pytest.raises(SAEError, match="layers 0..3"):
        gpt_oss.steer_feature(deep, 0, 1.0)
    # folders that are not SAEs
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(SAEError, match="not an SAE folder.*notes.txt"):
        load_sae(tmp_path / "empty")
    with pytest.raises(SAEError, match="not a folder"):
        load_sae(tmp_path / "missing")
    with pytest.raises(SAEError, match="not a folder"):
        load_sae(tmp_path / "empty" / "notes.txt")
    broken = write_saelens(tmp_path / "broken", saelens_cfg("standard"), {"W_enc": torch.zeros(D_IN, D_SAE)})
    with pytest.raises(SAEError, match="lacks b_enc, W_dec, b_dec"):
        load_sae(broken)
    (broken / "cfg.json").write_text("{not json")
    with pytest.raises(SAEError, match="not valid JSON"):
        load_sae(broken)
    base = {k: v for k, v in weights().items() if k != "threshold"}
    with pytest.raises(SAEError, match="threshold"):
        load_sae(write_saelens(tmp_path / "jr", saelens_cfg("jumprelu"), base))
    with pytest.raises(SAEError, match="'gated' is not supported"):
        load_sae(write_saelens(tmp_path / "gated", saelens_cfg("gated"), base))
    with pytest.raises(SAEError, match="layer_norm"):
        load_sae(write_saelens(tmp_path / "ln", saelens_cfg("standard", normalize_activations="layer_norm"), base))
    with pytest.raises(SAEError, match="hook_mlp_out"):
        load_sae(write_saelens(tmp_path / "mlp", saelens_cfg("standard", hook="blocks.1.hook_mlp_out"), base))
    assert load_sae(write_saelens(tmp_path / "mlp2", saelens_cfg("standard", hook="blocks.1.hook_mlp_out"), base),
                    layer=1).layer == 1  # the user says which layer's output it is
    with pytest.raises(SAEError, match="d_in=64"):
        sae.encode(torch.zeros(3, 10))
    with pytest.raises(InterventionError, match="finite"):
        gpt_oss.steer_feature(sae, 0, float("nan"))  # the steering intervention refuses non-finite scales


# ---- the token inspector ---------------------------------------------------------------------------------

def test_inspector_shows_the_selected_tokens_features(gpt_oss, tmp_path):
    from workbench.ui.widget import widget

    sae = tiny_sae(tmp_path)
    w = widget(gpt_oss, temperature=0.0, max_new_tokens=6)
    try:
        w.generate("Hi")
        g = w.wait(timeout=120)
        ins = w.inspector
        ins.select_token(1)
        assert ins.features is None and ins.features_html.value == ""  # no SAE attached: no panel
        ins.sae = sae
        ins.select_token(2)
        reference = tracing.trace(gpt_oss.model, gpt_oss.tokenizer, gpt_oss.adapter, g, what=["residuals"],
                                  layers=[sae.layer], dtype=torch.float32)
        position = len(g.prompt_ids) + 2  # the token's own position
        expected = features(reference, sae, 8).at(position)
        assert ins.features.at(position) == expected and expected
        for f, v in expected:
            assert f"<td>{f}</td>" in ins.features_html.value and f"{v:.3f}" in ins.features_html.value
        assert f"layer {sae.layer}" in ins.features_html.value
        cached = ins.features
        ins.select_token(3)  # one feature trace per generation and SAE
        assert ins.features is cached
        ins.sae = None
        ins.select_token(3)
        assert ins.features_html.value == ""
    finally:
        w.close()


# ---- the shipped SAE -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nano():
    return wb.load(str(fixtures.nano_path()), preset="cpu")


def test_the_shipped_sae_loads_and_is_small():
    folder = FIXTURES["nano"]
    sae = load_sae(folder)
    assert (sae.architecture, sae.k, sae.d_in, sae.layer) == ("topk", 16, 128, 1)
    assert sae.hook_name == "blocks.1.hook_resid_post" and sae.metadata["model_name"] == "gpt-oss-nano"
    assert sum(p.stat().st_size for p in folder.parent.rglob("*") if p.is_file()) <= 5_000_000
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-4)  # unit decoder rows
    assert sae.metadata["heldout"]["explained_variance"] > 0.8 and (folder / "NOTES.md").is_file()


def test_the_shipped_digit_feature_fires_on_digits(nano):
    sae = load_sae(FIXTURES["nano"])
    digit = sae.metadata["features"]["digits"]["feature"]
    text = "Invoice 4821 was paid on 2019-03-27 for 560 euros; see page 73 of volume 9."  # not in its data
    t = nano.trace(text, what=["residuals"], layers=[sae.layer], dtype=torch.float32)
    acts = sae.encode(t.residual(sae.layer))[:, digit]
    is_digit = torch.tensor([bool(re.fullmatch(r"\s*\d+", tok)) for tok in t.tokens.strings])
    assert is_digit.sum() >= 10
    assert acts[is_digit].mean() > 4 * acts[~is_digit].mean()
    assert is_digit[acts.topk(5).indices].all()


def test_steering_with_the_shipped_sae(nano):
    sae = load_sae(FIXTURES["nano"])
    outside = nano.trace(TEXT, what=["residuals"], dtype=torch.float32)
    with nano.steer_feature(sae, 3, 6.0):
        inside = nano.trace(TEXT, what=["residuals"], dtype=torch.float32)
    moved = inside.residual(1) - outside.residual(1)
    assert torch.allclose(moved, (6.0 * sae.W_dec[3]).expand_as(moved), atol=1e-4, rtol=0)
    assert torch.equal(inside.residual(0), outside.residual(0))


def test_saelens_itself_encodes_the_same(tmp_path):
    """Only where sae-lens is installed (its SAE classes import TransformerLens, so the lock leaves it out)."""
    sae_lens = pytest.importorskip("sae_lens")
    w = weights(seed=8)
    for arch, extra in (("standard", {}), ("topk", {"k": 5}), ("jumprelu", {})):
        stored = {k: v for k, v in w.items() if k != "threshold" or arch == "jumprelu"}
        folder = write_saelens(tmp_path / arch, saelens_cfg(arch, **extra), stored)
        theirs = sae_lens.SAE.load_from_disk(str(folder))
        x = torch.randn(7, D_IN)
        assert torch.allclose(load_sae(folder).encode(x), theirs.encode(x), atol=1e-6), arch
