"""CPU checks of encoders.py: REPA's preprocessing, DINOv2 from the hub, MAE's and MoCo v3's published files (written
here from random weights in their layouts) read strictly, the ViT against a forward written by hand, every refusal."""
import math
import re
import urllib.error

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import encoders
from encoders import ENCODERS, load_encoder, resample_pos_embed
from runtime import UserError

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TINY = dict(width=32, depth=2, heads=4)  # a ViT/16 small enough to check by hand, keys as ViT-B's


def gaussian(shape, dtype=torch.float32):
    return (0.3 * torch.randn(shape)).to(dtype)


def vit_state(width, depth, fill):
    """Every key and shape of timm's ViT/16 trained at 224 px (14×14 patches) as MAE's file and MoCo v3's base
    encoder hold it, without a classifier head."""
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, 1 + 14 * 14, width),
              "patch_embed.proj.weight": (width, 3, 16, 16), "patch_embed.proj.bias": (width,),
              "norm.weight": (width,), "norm.bias": (width,)}
    layers = {"norm1": (width,), "attn.qkv": (3 * width, width), "attn.proj": (width, width), "norm2": (width,),
              "mlp.fc1": (4 * width, width), "mlp.fc2": (width, 4 * width)}
    for i in range(depth):
        for layer, shape in layers.items():
            shapes[f"blocks.{i}.{layer}.weight"], shapes[f"blocks.{i}.{layer}.bias"] = shape, shape[:1]
    return {key: fill(shape) for key, shape in shapes.items()}


def moco_mlp(num_layers, d_in, hidden, d_out):
    """MoCo v3's _build_mlp: [Linear without bias → BatchNorm → ReLU] × (L − 1) → Linear → affine-free BatchNorm."""
    layers = []
    for l in range(num_layers):
        last = l == num_layers - 1
        layers += [nn.Linear(d_in if l == 0 else hidden, d_out if last else hidden, bias=False),
                   nn.BatchNorm1d(d_out if last else hidden, affine=not last)] + ([] if last else [nn.ReLU()])
    return nn.Sequential(*layers)


def moco_file(width, depth, fill, mlp_dim=4096, dim=256):
    """The layout of vit-b-300ep.pth.tar: main_moco.py's checkpoint of the DDP-wrapped MoCo_ViT, its two encoders
    with the 3-layer projection MLP as `head`, and the 2-layer predictor (--moco-mlp-dim 4096, --moco-dim 256)."""
    with torch.device("meta"):  # only the names and shapes
        head, predictor = moco_mlp(3, width, mlp_dim, dim).state_dict(), moco_mlp(2, dim, mlp_dim, dim).state_dict()
    state = {}
    for encoder in ("base_encoder", "momentum_encoder"):
        parts = vit_state(width, depth, fill) | {f"head.{k}": fill(v.shape, v.dtype) for k, v in head.items()}
        state |= {f"module.{encoder}.{k}": v for k, v in parts.items()}
    state |= {f"module.predictor.{k}": fill(v.shape, v.dtype) for k, v in predictor.items()}
    return {"epoch": 300, "arch": "vit_base", "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
            "scaler": {"scale": 65536.0, "_growth_tracker": 0}}


def vit_by_hand(state, images, heads, final_norm):
    """The ViT forward from its equations, on a state dict with the files' names: REPA's preprocessing for MAE and
    MoCo v3 (x/255, ImageNet mean/std, no resize), row-major 16-px patches, the 14×14 position embedding resampled
    to 16×16, pre-norm blocks x += Attn(LN(x)), x += MLP(LN(x)); the class token dropped."""
    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)

    def linear(x, name):
        return x @ state[f"{name}.weight"].mT + state[f"{name}.bias"]

    x = (images / 255 - MEAN) / STD
    N = len(x)
    patches = x.view(N, 3, 16, 16, 16, 16).permute(0, 2, 4, 1, 3, 5).reshape(N, 256, 3 * 16 * 16)  # (N, T, 3·p·p)
    x = patches @ state["patch_embed.proj.weight"].flatten(1).mT + state["patch_embed.proj.bias"]
    pos = state["pos_embed"]
    grid = F.interpolate(pos[:, 1:].mT.reshape(1, -1, 14, 14), size=16, mode="bicubic", antialias=True)
    x = torch.cat([state["cls_token"].expand(N, 1, -1), x], dim=1) + torch.cat([pos[:, :1], grid.flatten(2).mT], 1)
    for i in range(len({k.split(".")[1] for k in state if k.startswith("blocks.")})):
        b = f"blocks.{i}"
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2)
                   for t in linear(norm(x, f"{b}.norm1"), f"{b}.attn.qkv").chunk(3, dim=-1))  # (N, h, 1 + T, D/h)
        attention = torch.softmax(q @ k.mT / math.sqrt(q.shape[-1]), dim=-1) @ v
        x = x + linear(attention.transpose(1, 2).flatten(2), f"{b}.attn.proj")
        x = x + linear(F.gelu(linear(norm(x, f"{b}.norm2"), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
    return (norm(x, "norm") if final_norm else x)[:, 1:]


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(encoders, "VIT_B", TINY)
    torch.manual_seed(0)


def assert_frozen(encoder):
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


# ---------------------------------------------------------------- MAE and MoCo v3


def test_mae_reads_its_published_file_and_is_the_vit_by_hand_without_final_norm(tiny, tmp_path):
    state = vit_state(TINY["width"], TINY["depth"], gaussian)
    torch.save({"model": state}, tmp_path / "mae_pretrain_vit_base.pth")
    mae = load_encoder("mae-vit-b", 256, 256, tmp_path)
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    with torch.no_grad():
        tokens = mae(images)
    assert tokens.shape == (2, 256, 32) and mae.embed_dim == 32
    expected = vit_by_hand(state, images, TINY["heads"], final_norm=False)
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())  # float32 sums
    assert_frozen(mae)


def test_mocov3_reads_the_base_encoder_of_its_published_file_with_final_norm(tiny, tmp_path):
    checkpoint = moco_file(TINY["width"], TINY["depth"], gaussian, mlp_dim=64, dim=16)
    torch.save(checkpoint, tmp_path / "vit-b-300ep.pth.tar")
    mocov3 = load_encoder("mocov3-vit-b", 256, 256, tmp_path)
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    with torch.no_grad():
        tokens = mocov3(images)
    encoder = {name: {k.removeprefix(f"module.{name}."): v for k, v in checkpoint["state_dict"].items()
                      if k.startswith(f"module.{name}.")} for name in ("base_encoder", "momentum_encoder")}
    expected = vit_by_hand(encoder["base_encoder"], images, TINY["heads"], final_norm=True)
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    momentum = vit_by_hand(encoder["momentum_encoder"], images, TINY["heads"], final_norm=True)
    assert not torch.allclose(tokens, momentum, rtol=0.1, atol=0.1)  # the base (query) encoder, not the other
    assert_frozen(mocov3)


def test_vit_b_reads_files_with_every_key_and_shape_of_the_published_ones(tmp_path):
    def zeros(shape, dtype=torch.float32):  # the real shapes on a one-element storage: small files, fast
        return torch.zeros((), dtype=dtype).expand(shape)

    torch.save({"model": vit_state(768, 12, zeros)}, tmp_path / "mae_pretrain_vit_base.pth")
    torch.save(moco_file(768, 12, zeros), tmp_path / "vit-b-300ep.pth.tar")
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) < 2**20
    for name in ("mae-vit-b", "mocov3-vit-b"):
        vit = load_encoder(name, 256, 256, tmp_path)
        assert vit.embed_dim == 768 and all(block.attn.num_heads == 12 for block in vit.blocks)
        assert {m.eps for m in vit.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}  # both papers' ViT-B
        # timm's ViT-B/16 at 224 px (86,567,656) without its 1000-class head, with 16² − 14² positions more
        assert sum(p.numel() for p in vit.parameters()) == 86_567_656 - 769_000 + 60 * 768
        assert not vit.blocks[11].mlp.fc2.weight.any() and not vit.pos_embed.any()  # read from the file


def test_a_file_that_is_not_the_published_checkpoint_is_refused_in_one_line(tiny, tmp_path):
    state = vit_state(TINY["width"], TINY["depth"], gaussian)
    qkv = "blocks.0.attn.qkv.weight"
    cases = [({k: v for k, v in state.items() if k != "blocks.1.norm2.bias"}, 'Missing key.*"blocks.1.norm2.bias"'),
             (state | {"mask_token": gaussian((1, 1, 16))}, 'Unexpected key.*"mask_token"'),  # MAE with its decoder
             (state | {qkv: state[qkv].mT}, f"size mismatch for {qkv}"),                      # permuted
             ({k.replace("mlp.fc", "mlp.linear"): v for k, v in state.items()}, "Missing key.*mlp.fc1")]
    path = tmp_path / "mae_pretrain_vit_base.pth"
    refusal = re.escape(f"{path} is not mae_pretrain_vit_base.pth as its authors publish it (RuntimeError: ")
    for model, match in cases:
        torch.save({"model": model}, path)
        with pytest.raises(UserError, match=f"{refusal}.*{match}") as error:
            load_encoder("mae-vit-b", 256, 256, tmp_path)
        assert "\n" not in str(error.value)
    for checkpoint in [state, moco_file(32, 2, gaussian, 64, 16)]:
        torch.save(checkpoint, path)  # a bare state dict; MoCo v3's file under MAE's name
        with pytest.raises(UserError, match="KeyError: 'model'"):
            load_encoder("mae-vit-b", 256, 256, tmp_path)
    path.write_bytes(b"<html>Access denied</html>")  # a failed download
    with pytest.raises(UserError, match="is not mae_pretrain_vit_base.pth as its authors publish it"):
        load_encoder("mae-vit-b", 256, 256, tmp_path)
    torch.save({"state_dict": state}, tmp_path / "vit-b-300ep.pth.tar")  # no `module.`
    with pytest.raises(UserError, match="KeyError: 'pos_embed'"):
        load_encoder("mocov3-vit-b", 256, 256, tmp_path)


# ---------------------------------------------------------------- DINOv2


class FakeDINOv2(nn.Module):
    """torch.hub's DINOv2 as REPA uses it: a 37×37-patch position embedding (518-px pretraining), a classifier
    `head`, and forward_features(x)["x_norm_patchtokens"]."""

    embed_dim = 8

    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + 37 * 37, 8))
        self.head = nn.Linear(8, 8)
        self.hub_pos_embed = self.pos_embed.detach().clone()

    def forward_features(self, x):
        self.seen = x
        return {"x_norm_patchtokens": x.mean(dim=1).flatten(1)[:, :, None]}


def test_dinov2_comes_from_the_hub_resampled_and_preprocessed_as_repa(monkeypatch):
    calls, fakes = [], []

    def hub_load(*args, **kwargs):
        calls.append((args, kwargs))
        fakes.append(FakeDINOv2())
        return fakes[-1]

    monkeypatch.setattr(torch.hub, "load", hub_load)
    target = load_encoder("dinov2-vit-b", 256, 256)
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    target(images)
    expected = F.interpolate((images / 255 - MEAN) / STD, size=224, mode="bicubic")  # REPA's preprocess_raw_image
    torch.testing.assert_close(fakes[0].seen, expected)
    assert target.embed_dim == 8 and isinstance(fakes[0].head, nn.Identity)
    torch.testing.assert_close(fakes[0].pos_embed.data, resample_pos_embed(fakes[0].hub_pos_embed, 16))
    assert_frozen(target)
    target = load_encoder("dinov2-vit-g", 512, 1024)
    assert target.input_size == 448 and fakes[1].pos_embed.shape == (1, 1 + 32 * 32, 8)
    assert calls == [(("facebookresearch/dinov2", "dinov2_vitb14"), {"trust_repo": True}),
                     (("facebookresearch/dinov2", "dinov2_vitg14"), {"trust_repo": True})]


def test_an_unreachable_hub_is_one_clear_line(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(UserError, match="could not load dinov2_vitb14 through torch.hub .*no network.*hub cache"):
        load_encoder("dinov2-vit-b", 256, 256)


def test_resample_pos_embed_keeps_the_class_slot_and_constant_fields():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    pos[:, 1:] = torch.linspace(-1, 1, 8)  # every patch position the same vector
    out = resample_pos_embed(pos, 16)
    assert out.shape == (1, 1 + 16 * 16, 8)
    torch.testing.assert_close(out[:, 0], pos[:, 0])
    torch.testing.assert_close(out[:, 1:], pos[:, 1:2].expand(1, 256, 8))


# ---------------------------------------------------------------- the user's mistakes


def test_every_mistake_is_refused_in_one_line_before_anything_is_downloaded_or_read(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "load", lambda *args, **kwargs: pytest.fail("torch.hub.load was called"))
    cases = [(("clip-vit-l", 256, 256), "unknown encoder 'clip-vit-l'; choose one of " + ", ".join(ENCODERS)),
             (("dinov2-vit-b", 16, 16), "DINOv2 target needs images of 256 or 512 px"),
             (("dinov2-vit-b", 256, 64), "the model has 64 tokens and DINOv2 256 at 256 px: use patch size 2"),
             (("mae-vit-b", 512, 1024), "mae-vit-b target needs images of 256 px"),
             (("mocov3-vit-b", 256, 64), "the model has 64 tokens and mocov3-vit-b 256 at 256 px"),
             (("mae-vit-b", 256, 256), f"{tmp_path / 'mae_pretrain_vit_base.pth'}: download "
                                       "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth into "
                                       f"{tmp_path} (--encoder-dir sets the folder)"),
             (("mocov3-vit-b", 256, 256), "vit-b-300ep.pth.tar: download "
                                          "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar")]
    assert ENCODERS == ("dinov2-vit-s", "dinov2-vit-b", "dinov2-vit-l", "dinov2-vit-g", "mae-vit-b", "mocov3-vit-b")
    for args, message in cases:
        with pytest.raises(UserError, match=re.escape(message)) as error:
            load_encoder(*args, weights_dir=tmp_path)
        assert "\n" not in str(error.value)
