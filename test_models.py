"""CPU checks of models.py: registry, official checkpoint layout, adaLN-Zero, long residuals, features, CFG."""
import json
from pathlib import Path

import pytest
import torch

import models
from losses import diversity_loss, diversity_pairs
from models import SiT, build_model, config_from_state_dict

# Parameter counts with 4 output channels, computed from the architecture (DiT/SiT/REPA; fast-DiT logs
# 675,129,632 for XL/2 with learn_sigma).
PAPER_PARAMS = {"SiT-S/2": 32_957_200, "SiT-B/2": 130_500_112, "SiT-L/2": 458_086_416, "SiT-XL/2": 675_111_184}
TINY = dict(input_size=8, depth=4, hidden_size=32, num_heads=2, patch_size=2, num_classes=10)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def randomize(model, seed=0):
    """Random weights everywhere (adaLN-Zero would make every output 0 and every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(n=3, size=8, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, size, size, generator=g), torch.rand(n, generator=g),
            torch.randint(0, classes, (n,), generator=g))


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("name", sorted(models.SiT_models))
def test_every_registry_entry_builds_with_the_right_output_shape(name):
    with torch.device("meta"):
        model = build_model(name)
        v = model(torch.zeros(2, 4, 32, 32), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert v.shape == (2, 4, 32, 32)
    depth, width, heads = models.SIT_SIZES[name[4:-2]]
    assert (len(model.blocks), model.pos_embed.shape[-1], model.blocks[0].attn.num_heads) == (depth, width, heads)
    assert model.patch_size == int(name[-1])


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_papers(name):
    with torch.device("meta"):
        assert count_params(build_model(name)) == PAPER_PARAMS[name]


def test_long_residuals_add_half_depth_fusions_of_layernorm_and_linear():
    # Each fusion: LayerNorm(2D) affine (4D) + Linear(2D → D) with bias (2D² + D). XL: 14 fusions.
    with torch.device("meta"):
        plain, diverse = build_model("SiT-XL/2"), build_model("SiT-XL/2", long_residual=True)
    d = 1152
    assert count_params(diverse) - count_params(plain) == 14 * (4 * d + 2 * d * d + d)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'SiT-XXL/2'"):
        build_model("SiT-XXL/2")


def test_bad_configurations_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="even depth"):
        SiT(**{**TINY, "depth": 5}, long_residual=True)
    with pytest.raises(ValueError, match="encoder_depth"):
        SiT(**TINY, z_dims=[16], encoder_depth=5)
    with pytest.raises(ValueError, match="encoder_depth"):  # no silent default: the paper's B and XL differ
        SiT(**TINY, z_dims=[16])
    with pytest.raises(ValueError, match="SRA"):
        SiT(**TINY, sra_depth=0)
    with pytest.raises(ValueError, match="expected input of shape"):
        SiT(**TINY)(torch.zeros(2, 4, 16, 16), torch.zeros(2), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------- official checkpoint layout


# Every key and shape of the released SiT-XL/2 (willisma/SiT, learn_sigma=True) and REPA SiT-XL/2 (one 768-d
# projector) state dicts, read off their model code (../shared/reference/official_state_dict_shapes.json).
OFFICIAL_SHAPES = json.loads((Path(__file__).parent / "test_data" / "official_state_dict_shapes.json").read_text())


def official(prefix):
    (name,) = [k for k in OFFICIAL_SHAPES if k.startswith(prefix)]
    return {key: tuple(shape) for key, shape in OFFICIAL_SHAPES[name].items()}


def state_dict_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_sit_xl2_layout_equals_the_official_learn_sigma_checkpoint():
    with torch.device("meta"):
        model = build_model("SiT-XL/2", learn_sigma=True)
    assert state_dict_shapes(model) == official("SiT-XL/2 (willisma/SiT")


def test_repa_xl2_layout_equals_the_official_last_pt():
    with torch.device("meta"):
        model = build_model("SiT-XL/2", z_dims=[768], encoder_depth=8)
    assert state_dict_shapes(model) == official("SiT-XL/2 (sihyun-yu/REPA")


def test_the_official_layouts_are_recognised_from_their_shapes():
    for prefix, learn_sigma in [("SiT-XL/2 (willisma/SiT", True), ("SiT-XL/2 (sihyun-yu/REPA", False)]:
        state_dict = {key: torch.empty(shape, device="meta") for key, shape in official(prefix).items()}
        assert config_from_state_dict(state_dict) == ("SiT-XL/2", dict(
            input_size=32, in_channels=4, num_classes=1000, learn_sigma=learn_sigma, long_residual=False,
            meanflow=False))


@pytest.mark.parametrize("name", ["SiT-S/4", "SiT-B/8", "SiT-L/2", "SiT-Tiny/4"])
def test_config_from_state_dict_rebuilds_the_same_network(name):
    config = dict(input_size=16, in_channels=3, num_classes=7, learn_sigma=name.endswith("/8"),
                  long_residual=name.startswith("SiT-L"), meanflow=name.startswith("SiT-S"))
    with torch.device("meta"):
        model = build_model(name, z_dims=[32], encoder_depth=2, sra_depth=3, **config)
    assert config_from_state_dict(model.state_dict()) == (name, config)  # the training heads are left out


def test_config_from_state_dict_says_what_it_got():
    with pytest.raises(ValueError, match="not a SiT state dict: no x_embedder.proj.weight.*encoder.conv_in"):
        config_from_state_dict({"encoder.conv_in.weight": torch.zeros(1), "pos_embed": torch.zeros(1)})
    with torch.device("meta"):
        state_dict = build_model("SiT-B/2").state_dict()
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("blocks.11.")}  # depth 11
    with pytest.raises(ValueError, match="depth 11 and width 768 matches no registered size"):
        config_from_state_dict(state_dict)
    with pytest.raises(ValueError, match="no transformer blocks"):
        config_from_state_dict({k: v for k, v in state_dict.items() if not k.startswith("blocks.")})
    with torch.device("meta"):
        state_dict = build_model("SiT-B/2").state_dict()
    state_dict["final_layer.linear.weight"] = torch.empty(12, 768, device="meta")  # 3 channels for 4 inputs
    with pytest.raises(ValueError, match="predicts 3 channels for 4 input channels"):
        config_from_state_dict(state_dict)


def test_learn_sigma_discards_the_variance_channels():
    model = randomize(SiT(**TINY, learn_sigma=True))
    raw = []
    model.final_layer.register_forward_hook(lambda m, args, out: raw.append(out))
    v = model(*inputs())
    full = model.unpatchify(raw[0])  # (N, 2C, H, W): the network does predict 2·C channels
    assert full.shape[1] == 8
    torch.testing.assert_close(v, full[:, :4])


def test_saved_and_reloaded_state_dict_gives_identical_outputs(tmp_path):
    model = randomize(SiT(**TINY, long_residual=True, z_dims=[16], encoder_depth=2, sra_depth=1))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    reloaded = SiT(**TINY, long_residual=True, z_dims=[16], encoder_depth=2, sra_depth=1).eval()
    reloaded.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    x, t, y = inputs()
    (v1, f1), (v2, f2) = model(x, t, y, return_features=True), reloaded(x, t, y, return_features=True)
    assert torch.equal(v1, v2) and torch.equal(f1.repa[0], f2.repa[0]) and torch.equal(f1.sra, f2.sra)


def test_long_residual_keys_are_the_authors_release_keys():
    keys = set(SiT(**TINY, long_residual=True).state_dict())
    for k in range(2):
        assert {f"skip_norms.{k}.weight", f"skip_norms.{k}.bias",
                f"skip_linears.{k}.linear.weight", f"skip_linears.{k}.linear.bias"} <= keys
    assert not any(key.startswith("skip_") for key in SiT(**TINY).state_dict())


# ---------------------------------------------------------------- initialisation and embeddings


def test_adaln_zero_gives_exactly_zero_output_and_identity_blocks_at_init():
    torch.manual_seed(0)
    model = SiT(**TINY).eval()
    x, t, y = inputs()
    v, feats = model(x, t, y, return_features=True)
    assert torch.equal(v, torch.zeros_like(v))
    tokens = model.x_embedder(x) + model.pos_embed
    for f in feats.blocks:  # every block is the identity at init
        assert torch.equal(f, tokens)


def test_long_residual_model_also_outputs_zero_at_init():
    model = SiT(**TINY, long_residual=True).eval()
    v = model(*inputs())
    assert torch.equal(v, torch.zeros_like(v))


def test_timestep_embedding_is_cos_then_sin_of_unscaled_t():
    t = torch.tensor([0.0, 0.3, 1.0])
    emb = models.TimestepEmbedder.timestep_embedding(t, 256)
    k = torch.arange(128, dtype=torch.float32)
    freqs = 10000.0 ** (-k / 128)
    torch.testing.assert_close(emb[:, :128], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, 128:], torch.sin(t[:, None] * freqs))


def test_2d_position_embedding_encodes_column_then_row():
    dim, grid = 16, 4
    pe = models.get_2d_sincos_pos_embed(dim, grid)[0]  # (T, dim)
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    row, col = 2, 3  # token 2·4 + 3 = 11 in row-major order
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega),
                          torch.sin(row * omega), torch.cos(row * omega)]).float()
    torch.testing.assert_close(pe[row * grid + col], expected)
    assert not SiT(**TINY).pos_embed.requires_grad


def test_label_dropout_uses_the_null_class_only_in_training():
    emb = models.LabelEmbedder(num_classes=10, hidden_size=4, dropout_prob=0.5)
    y = torch.arange(10).repeat(100)
    torch.manual_seed(0)
    dropped = (emb.drop(y) == 10).float().mean()
    assert 0.4 < dropped < 0.6
    emb.eval()
    assert torch.equal(emb.drop(y), y)


def test_features_carry_the_labels_after_dropout():
    model = randomize(SiT(**TINY, class_dropout_prob=0.5)).train()
    x, t, y = inputs()
    y = y.repeat(8)
    torch.manual_seed(0)
    v, feats = model(x.repeat(8, 1, 1, 1), t.repeat(8), y, return_features=True)
    assert ((feats.labels == y) | (feats.labels == TINY["num_classes"])).all() and (feats.labels != y).any()
    model.eval()  # the same labels through the model in eval mode give the same velocity
    torch.testing.assert_close(model(x.repeat(8, 1, 1, 1), t.repeat(8), feats.labels), v)


# ---------------------------------------------------------------- long residual connections


def test_long_residual_fuses_block_j_with_block_L_minus_1_minus_j():
    """Recompute the forward by hand: after block j ≥ L/2, x ← Linear(LayerNorm([x ‖ out_{L−1−j}]))."""
    model = randomize(SiT(**{**TINY, "depth": 6}, long_residual=True))
    x, t, y = inputs()
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    outputs = {}
    for j, block in enumerate(model.blocks):
        h = block(h, c)
        if j >= 3:
            partner = outputs[5 - j]
            norm, linear = model.skip_norms[j - 3], model.skip_linears[j - 3].linear
            h = linear(torch.nn.functional.layer_norm(torch.cat([h, partner], -1), (64,), norm.weight, norm.bias, 1e-6))
        outputs[j] = h
    v_hand = model.unpatchify(model.final_layer(h, c))
    v, feats = model(x, t, y, return_features=True)
    torch.testing.assert_close(v, v_hand)
    for j in range(6):
        torch.testing.assert_close(feats.blocks[j], outputs[j])  # features are taken after the fusion


def test_fusion_layernorm_runs_in_float32(monkeypatch):
    seen = []
    layer_norm = torch.nn.functional.layer_norm
    monkeypatch.setattr(models.F, "layer_norm", lambda x, *args: seen.append(x.dtype) or layer_norm(x, *args))
    norm = models.LayerNorm32(8, eps=1e-6)
    x = torch.randn(2, 3, 8).bfloat16()
    out = norm(x)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16  # computed in float32, returned in bf16
    torch.testing.assert_close(out, layer_norm(x.float(), (8,), eps=1e-6).bfloat16())


# ---------------------------------------------------------------- features


def test_features_do_not_change_the_velocity_and_have_the_documented_shapes():
    model = randomize(SiT(**TINY, long_residual=True, z_dims=[16, 24], encoder_depth=3, sra_depth=2))
    x, t, y = inputs()
    v_plain = model(x, t, y)
    v, feats = model(x, t, y, return_features=True)
    assert torch.equal(v, v_plain)
    assert len(feats.blocks) == 4 and all(f.shape == (3, 16, 32) for f in feats.blocks)
    assert [z.shape for z in feats.repa] == [(3, 16, 16), (3, 16, 24)]
    torch.testing.assert_close(feats.repa[1], model.projectors[1](feats.blocks[2]))  # block 3, 1-indexed
    torch.testing.assert_close(feats.sra, model.sra_head(feats.blocks[1]))            # block 2, 1-indexed
    assert feats.blocks[0].requires_grad  # not detached: the diversity loss trains through them


def test_each_projector_reads_its_own_block_when_several_are_aligned():
    model = randomize(SiT(**TINY, z_dims=[16, 16, 24], encoder_depth=[1, 4, 2]))  # the paper's A2: [2, 5, 8], …
    _, feats = model(*inputs(), return_features=True)
    for projector, block, z in zip(model.projectors, [0, 3, 1], feats.repa):
        torch.testing.assert_close(z, projector(feats.blocks[block]))
    with pytest.raises(ValueError, match="one per projector; got \\[1, 2\\] for 3 projectors"):
        SiT(**TINY, z_dims=[16, 16, 24], encoder_depth=[1, 2])


def test_bf16_autocast_forward_and_float32_diversity_loss():
    model = randomize(SiT(**TINY, long_residual=True, z_dims=[16], encoder_depth=2))
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, feats = model(x, t, y, return_features=True)
        l_div = diversity_loss(feats.blocks, diversity_pairs(4)).total
    torch.testing.assert_close(v.float(), model(x, t, y), atol=0.05, rtol=0.05)
    assert l_div.dtype == torch.float32 and torch.isfinite(l_div)


def test_forward_with_features_traces_without_graph_breaks():
    model = randomize(SiT(**TINY, long_residual=True, z_dims=[16], encoder_depth=2))
    x, t, y = inputs()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    v, feats = compiled(x, t, y, return_features=True)
    torch.testing.assert_close(v, model(x, t, y))


# ---------------------------------------------------------------- time convention and guidance


def test_sit_time_runs_a_sit_convention_model_in_ours():
    """v_ours(x, t) = −v_sit(x, 1 − t): the same weights read as a SiT-convention network."""
    sit = randomize(SiT(**TINY, learn_sigma=True))
    ours = SiT(**TINY, learn_sigma=True, sit_time=True).eval()
    ours.load_state_dict(sit.state_dict())
    x, t, y = inputs()
    torch.testing.assert_close(ours(x, t, y), -sit(x, 1 - t, y))


def test_sit_time_on_a_known_field_gives_the_velocity_of_our_interpolant():
    """A SiT-convention oracle for one data point x*: z_s = s·x* + (1 − s)·ε, v_sit = x* − ε. Through the
    conversion, at our t = 1 − s the same z must get our velocity ε − x*."""
    x_star = torch.randn(1, 4, 8, 8)

    class Oracle(SiT):
        def unpatchify(self, h):  # the exact SiT velocity of the (z, s) that the network was given
            s = self.seen_t[:, None, None, None]
            eps = (self.seen_z - s * x_star) / (1 - s)
            return x_star - eps

    oracle = Oracle(**TINY, sit_time=True).eval()
    oracle.x_embedder.register_forward_pre_hook(lambda m, args: setattr(oracle, "seen_z", args[0]))
    oracle.t_embedder.register_forward_pre_hook(lambda m, args: setattr(oracle, "seen_t", args[0]))
    eps = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t = (1 - t)[:, None, None, None] * x_star + t[:, None, None, None] * eps  # our interpolant
    torch.testing.assert_close(oracle(x_t, t, torch.zeros(3, dtype=torch.long)), eps - x_star)


def test_cfg_scale_one_is_the_conditional_prediction():
    model = randomize(SiT(**TINY))
    x, t, y = inputs()
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), model(x, t, y))


def test_cfg_guides_all_channels():
    model = randomize(SiT(**TINY))
    x, t, y = inputs()
    v_cond = model(x, t, y)
    v_uncond = model(x, t, torch.full_like(y, model.num_classes))
    v = model.forward_with_cfg(x, t, y, 4.0)
    torch.testing.assert_close(v, v_uncond + 4.0 * (v_cond - v_uncond))
    assert (v - v_cond).abs().amax(dim=(0, 2, 3)).min() > 0  # every channel moved, not DiT's first three


def test_cfg_runs_one_batched_forward_and_none_extra_at_scale_one():
    model = randomize(SiT(**TINY))
    x, t, y = inputs()
    batch_sizes = []
    model.x_embedder.register_forward_hook(lambda m, args, out: batch_sizes.append(out.shape[0]))
    model.forward_with_cfg(x, t, y, 1.0)
    model.forward_with_cfg(x, t, y, 2.0)
    assert batch_sizes == [3, 6]


def test_cfg_combines_in_float32_under_bf16_autocast():
    model = randomize(SiT(**TINY))
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = model.forward_with_cfg(x, t, y, 4.0)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]))
    v_cond, v_uncond = both.float().chunk(2)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, v_uncond + 4.0 * (v_cond - v_uncond))


def test_cfg_needs_a_null_class():
    model = SiT(**{**TINY, "class_dropout_prob": 0.0})
    model.forward_with_cfg(*inputs(), 1.0)  # unguided is fine
    with pytest.raises(ValueError, match="null class"):
        model.forward_with_cfg(*inputs(), 2.0)
