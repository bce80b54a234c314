"""CPU checks of vae.py: the public layout, the weight formats, encoding and decoding."""
import json
import struct
import urllib.error
from pathlib import Path

import pytest
import torch

import vae as vae_module
from conftest import write_safetensors
from runtime import UserError
from vae import (LATENT_SCALE, AutoencoderKL, decode_latents, encode_images, load_vae, read_safetensors,
                 sample_latents)

# Every key and shape of the public sd-vae-ft-{ema,mse} checkpoints (diffusers' AutoencoderKL with their config).
PUBLIC_SHAPES = next(iter(json.loads(
    (Path(__file__).parent / "test_data" / "sd_vae_state_dict_shapes.json").read_text()).values()))
OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the network


def test_state_dict_matches_the_public_layout(sd_vae):
    state_dict = sd_vae[0].state_dict()
    assert {k: list(v.shape) for k, v in state_dict.items()} == PUBLIC_SHAPES
    assert sum(v.numel() for v in state_dict.values()) == 83_653_863


def test_encode_decode_shapes(sd_vae):
    vae = sd_vae[0]
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    mean, std = vae.encode(x)
    assert mean.shape == std.shape == (2, 4, 4, 6)
    assert (std > 0).all()
    assert vae.decode(mean).shape == (2, 3, 32, 48)


def test_log_variance_is_clamped_to_20():
    vae = AutoencoderKL()
    with torch.no_grad():  # quant_conv outputs mean 0 and log-variance 100 everywhere
        vae.quant_conv.weight.zero_()
        vae.quant_conv.bias.copy_(torch.tensor([0.0] * 4 + [100.0] * 4))
        mean, std = vae.encode(torch.zeros(1, 3, 16, 16))
    assert (mean == 0).all()
    torch.testing.assert_close(std, torch.full_like(std, torch.exp(torch.tensor(10.0)).item()))


def test_encode_images_scales_uint8_to_minus_one_one_and_chunks(sd_vae):
    vae = sd_vae[0]
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    mean, std = vae.encode(images.float() / 127.5 - 1)
    moments = encode_images(vae, images, chunk_size=3)
    assert moments.shape == (3, 8, 2, 2) and moments.dtype == torch.float32
    torch.testing.assert_close(moments, torch.cat([mean, std], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(encode_images(vae, images, chunk_size=1), moments, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_runs_in_bfloat16_and_returns_float32(sd_vae):
    vae = sd_vae[0]
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    fp32, bf16 = encode_images(vae, images), encode_images(vae, images, bf16=True)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # computed in bf16: rounded differently
    torch.testing.assert_close(bf16, fp32, rtol=0.1, atol=0.1)
    z = torch.randn(2, 4, 2, 2)
    decoded = decode_latents(vae, z, bf16=True)
    assert decoded.dtype == torch.float32 and not torch.equal(decoded, decode_latents(vae, z))


def test_sample_latents_draws_a_scaled_posterior_sample():
    mean, std = torch.randn(2, 4, 3, 3), torch.rand(2, 4, 3, 3)
    torch.manual_seed(5)
    z = sample_latents(torch.cat([mean, std], dim=1))
    torch.manual_seed(5)
    torch.testing.assert_close(z, (mean + std * torch.randn(2, 4, 3, 3)) * 0.18215)
    assert LATENT_SCALE == 0.18215


def test_decode_latents_unscales_and_chunks(sd_vae):
    vae = sd_vae[0]
    z = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(decode_latents(vae, z, chunk_size=3), vae.decode(z / LATENT_SCALE), rtol=0, atol=0)
    torch.testing.assert_close(decode_latents(vae, z, chunk_size=2), vae.decode(z / LATENT_SCALE),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the safetensors reader


def test_read_safetensors_hand_written_bytes(tmp_path):
    header = {"__metadata__": {"format": "pt"},
              "b": {"dtype": "I64", "shape": [1, 2], "data_offsets": [8, 24]},
              "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    head = json.dumps(header).encode()
    body = struct.pack("<2f", 1.5, -2.0) + struct.pack("<2q", 7, -3)
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + body)
    tensors = read_safetensors(tmp_path / "x.safetensors")
    assert tensors.keys() == {"a", "b"}
    torch.testing.assert_close(tensors["a"], torch.tensor([1.5, -2.0]))
    torch.testing.assert_close(tensors["b"], torch.tensor([[7, -3]]))


def test_read_safetensors_round_trips_every_dtype(tmp_path):
    tensors = {"f64": torch.randn(2, dtype=torch.float64), "f32": torch.randn(3, 4), "f16": torch.randn(5).half(),
               "bf16": torch.randn(2, 2).bfloat16(), "i64": torch.tensor([-(2 ** 40), 3]),
               "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3), "i16": torch.tensor([-300], dtype=torch.int16),
               "i8": torch.tensor([-5, 7], dtype=torch.int8), "u8": torch.tensor([0, 255], dtype=torch.uint8),
               "bool": torch.tensor([True, False]), "empty": torch.zeros(0, 3), "scalar": torch.tensor(3.5)}
    write_safetensors(tensors, tmp_path / "x.safetensors", metadata={"note": "test"})
    read = read_safetensors(tmp_path / "x.safetensors")
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


def test_read_safetensors_rejects_broken_files(tmp_path):
    write_safetensors({"a": torch.randn(4)}, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-1])  # one byte of data missing
    with pytest.raises(ValueError, match="data offsets"):
        read_safetensors(tmp_path / "short.safetensors")
    (tmp_path / "text.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        read_safetensors(tmp_path / "text.safetensors")
    for header, error in [({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, "unsupported dtype"),
                          ([1, 2], "not a .safetensors file"), ({"a": {"dtype": "F32", "shape": [2]}}, "not a .safe")]:
        head = json.dumps(header).encode()
        (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + bytes(8))
        with pytest.raises(ValueError, match=error):
            read_safetensors(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------- loading the public weights


def test_load_vae_from_the_public_formats(sd_vae, tmp_path):
    vae, folder = sd_vae
    reference = vae.state_dict()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    # A folder with diffusion_pytorch_model.safetensors, as on the Hub.
    loaded = load_vae(str(folder))
    assert same_weights(loaded.state_dict(), reference)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded.encode(x), vae.encode(x), rtol=0, atol=0)
    # The .bin file with the older attention names, and a pipeline folder holding it under vae/.
    old = {}
    for key, value in reference.items():
        for new_name, old_name in OLD_NAMES.items():
            key = key.replace(f".{new_name}.", f".{old_name}.")
        old[key] = value
    assert sum(".query." in k or ".proj_attn." in k for k in old) == 8  # weight and bias, encoder and decoder
    (tmp_path / "vae").mkdir()
    torch.save(old, tmp_path / "vae" / "diffusion_pytorch_model.bin")
    assert same_weights(load_vae(str(tmp_path / "vae" / "diffusion_pytorch_model.bin")).state_dict(), reference)
    assert same_weights(load_vae(str(tmp_path)).state_dict(), reference)


def test_load_vae_refuses_other_state_dicts(sd_vae, tmp_path):
    state_dict = dict(sd_vae[0].state_dict())
    del state_dict["decoder.conv_out.bias"]
    write_safetensors(state_dict, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match="not an SD-VAE.*Missing.*decoder.conv_out.bias"):
        load_vae(str(tmp_path))


def test_a_file_that_is_not_weights_is_named_in_one_line(tmp_path):
    (tmp_path / "README.md").write_text("# a project\n")
    with pytest.raises(UserError, match=f"^{tmp_path / 'README.md'} is not SD-VAE weights: expected a .safetensors"):
        load_vae(str(tmp_path / "README.md"))


def test_missing_weights_are_errors_not_random_weights(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="neither 'ema', 'mse'"):
        load_vae(str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(UserError, match="no diffusion_pytorch_model"):
        load_vae(str(tmp_path))
    # No network: the error names the URL and the flag for a local file.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, progress=True):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match=r"huggingface.co/stabilityai/sd-vae-ft-ema/.*--vae PATH"):
        load_vae("ema")
    assert not (tmp_path / "hub").exists()  # not even an empty folder is left in the cache


def test_named_weights_come_from_the_hub_cache(sd_vae, tmp_path, monkeypatch):
    vae, folder = sd_vae
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    downloads = []

    def download(url, dst, progress=True):  # stands in for the network: copies our file where the URL would go
        downloads.append(url)
        Path(dst).write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    assert same_weights(load_vae("mse").state_dict(), vae.state_dict())
    assert same_weights(load_vae("mse").state_dict(), vae.state_dict())  # the second time from the cache
    assert downloads == [vae_module.VAE_URLS["mse"]]
    assert (tmp_path / "checkpoints" / "sd-vae-ft-mse" / "diffusion_pytorch_model.safetensors").is_file()
