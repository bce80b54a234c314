"""CPU checks of data.py: ADM's crop, the built-in shapes, and preparing / reading a latent folder."""
import argparse
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import write_safetensors
from runtime import UserError, temporary_path
from data import PreparedDataset, ShapesDataset, center_crop_arr, render_shape, shape_distance
from vae import encode_images

S = 16  # image size of the prepared test sets: 2×2 latents


# ---------------------------------------------------------------- ADM's center crop


def test_center_crop_keeps_an_image_of_the_target_size():
    array = np.random.default_rng(0).integers(0, 256, (S, S, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(array), S), array)


def test_center_crop_takes_the_middle_of_a_wide_image():
    array = np.random.default_rng(0).integers(0, 256, (S, 3 * S, 3), dtype=np.uint8)  # shorter side already S
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(array), S), array[:, S:2 * S])
    tall = np.random.default_rng(1).integers(0, 256, (S + 3, S, 3), dtype=np.uint8)  # offset (3 // 2) rounds down
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(tall), S), tall[1:S + 1])


def test_center_crop_halves_with_a_box_filter_while_the_short_side_is_at_least_twice_the_size():
    # 4S × 6S of constant 4×4 squares: two exact box halvings give S × 1.5S, the bicubic resize to the same size
    # changes nothing, and the crop takes the middle S columns.
    blocks = np.random.default_rng(0).integers(0, 256, (S, 3 * S // 2, 3), dtype=np.uint8)
    image = blocks.repeat(4, axis=0).repeat(4, axis=1)
    left = (3 * S // 2 - S) // 2
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(image), S), blocks[:, left:left + S])


def test_center_crop_resizes_with_bicubic_filtering_and_rounded_sizes():
    array = np.random.default_rng(2).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    # short side 24 < 2·16: no halving; scale 16/24 → 40·2/3 = 26.67 rounds to 27 columns; crop offset (27 − 16) // 2
    expected = np.asarray(Image.fromarray(array).resize((27, 16), resample=Image.BICUBIC))[:, 5:21]
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(array), S), expected)


def test_center_crop_resizes_the_short_side_to_the_target():
    image = Image.fromarray(np.full((24, 40, 3), 77, dtype=np.uint8))  # short side 24 < 2·16: bicubic to 16 × 27
    out = center_crop_arr(image, S)
    assert out.shape == (S, S, 3) and out.dtype == np.uint8 and (out == 77).all()


# ---------------------------------------------------------------- the built-in dataset


def test_shapes_dataset_is_deterministic_balanced_and_in_range():
    dataset = ShapesDataset(num_images=30, image_size=32, seed=3, images=True)
    assert len(dataset) == 30 and dataset.input_shape == (3, 32, 32) and not dataset.latent
    x, y, image = dataset[13]
    assert y == 3 and x.shape == (3, 32, 32) and image.dtype == torch.uint8
    torch.testing.assert_close(x, image.float() / 127.5 - 1)
    assert torch.equal(ShapesDataset(num_images=30, image_size=32, seed=3)[13][0], x)  # same seed, same image
    assert not torch.equal(ShapesDataset(num_images=30, image_size=32, seed=4)[13][0], x)
    assert [dataset[i][1] for i in range(30)] == [i % 10 for i in range(30)]
    with pytest.raises(IndexError):
        dataset[30]


def test_shape_distance_examples():
    u, v = np.array([0.0, 3.0, 5.0]), np.zeros(3)
    np.testing.assert_allclose(shape_distance(0, u, v, 4.0), [-4.0, -1.0, 1.0])           # disk: r − s
    np.testing.assert_allclose(shape_distance(4, u, v, 4.0), [2.0, -1.0, 1.0])            # ring |r − 3| − 1
    np.testing.assert_allclose(shape_distance(9, u, v, 4.0), [-1.4, 1.6, 3.6])            # vertical bar, half-width 1.4
    assert shape_distance(3, np.array([0.0]), np.array([-3.9]), 4.0)[0] < 0 < shape_distance(  # apex up
        3, np.array([0.0]), np.array([3.9]), 4.0)[0]


def test_every_class_draws_a_different_shape():
    masks = [render_shape(c, 32, np.random.default_rng(0)).astype(int) for c in range(10)]  # same centre, colours
    for a in range(10):
        for b in range(a):
            assert np.abs(masks[a] - masks[b]).sum() > 255 * 20, (a, b)  # > 20 pixels' worth of difference


def test_shapes_classifier_names_held_out_shapes(image_size=16):  # the quick start's size
    state = torch.get_rng_state()
    classifier = data.shapes_classifier(image_size, seed=0)
    assert torch.equal(torch.get_rng_state(), state) and not classifier.training  # the caller's random state kept
    x, y = next(iter(torch.utils.data.DataLoader(ShapesDataset(500, image_size, seed=1), batch_size=500)))
    accuracy = (classifier(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.95, accuracy


# ---------------------------------------------------------------- preparing a folder


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """Class folders made in unsorted order, images of several sizes and modes, and one unreadable file."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for name, count in [("n02_zebra", 3), ("n01_apple", 4), ("n03_mango", 2)]:
        (root / name).mkdir()
        for i in range(count):
            size = (int(rng.integers(S, 3 * S)), int(rng.integers(S, 3 * S)))
            Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(root / name / f"{i}.JPEG")
    Image.fromarray(rng.integers(0, 256, (40, 20), dtype=np.uint8), "L").save(root / "n03_mango" / "gray.png")
    (root / "n01_apple" / "broken.jpg").write_bytes(b"not an image")
    (root / "n01_apple" / "notes.txt").write_text("not an image file: ignored, as by ImageFolder")
    return root


def prepare_args(image_tree, vae_folder, out, **changes):
    return argparse.Namespace(**{"data_path": str(image_tree), "out": str(out), "image_size": S,
                                 "vae": str(vae_folder), "images": True, "batch_size": 3, "num_workers": 0,
                                 "bf16": False, **changes})


def read_arrays(out):
    return {name: np.load(Path(out) / name) for name in (data.LABELS, data.STATUS, data.MOMENTS, data.IMAGES)}


@pytest.fixture(scope="module")
def prepared(image_tree, sd_vae, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "in16"
    data.main(prepare_args(image_tree, sd_vae[1], out))
    return out


def test_prepare_writes_labels_images_and_moments(prepared, image_tree, sd_vae):
    files = (prepared / data.FILES).read_text().splitlines()
    arrays = read_arrays(prepared)
    meta = data.read_metadata(prepared)
    assert meta["classes"] == ["n01_apple", "n02_zebra", "n03_mango"] and meta["num_images"] == 11 == len(files)
    assert files[0] == os.path.join("n01_apple", "0.JPEG") and "n01_apple/notes.txt" not in files
    np.testing.assert_array_equal(arrays[data.LABELS], [0] * 5 + [1] * 3 + [2] * 3)
    broken = files.index(os.path.join("n01_apple", "broken.jpg"))
    assert arrays[data.STATUS][broken] == data.SKIPPED and (np.delete(arrays[data.STATUS], broken) == data.DONE).all()
    assert arrays[data.MOMENTS].shape == (11, 8, 2, 2) and arrays[data.IMAGES].shape == (11, 3, S, S)
    for i in (0, 7, 10):  # the stored crop and its moments, recomputed from the file
        with Image.open(image_tree / files[i]) as image:
            crop = torch.from_numpy(center_crop_arr(image.convert("RGB"), S)).permute(2, 0, 1)
        np.testing.assert_array_equal(arrays[data.IMAGES][i], crop.numpy())
        torch.testing.assert_close(torch.from_numpy(arrays[data.MOMENTS][i]), encode_images(sd_vae[0], crop[None])[0],
                                   rtol=1e-5, atol=1e-5)


def test_prepared_dataset_serves_moments_labels_and_images(prepared):
    dataset = PreparedDataset(prepared, images=True)
    assert len(dataset) == 10 and dataset.num_classes == 3 and dataset.latent  # the unreadable image left out
    assert dataset.input_shape == (4, 2, 2) and dataset.image_size == S
    arrays = read_arrays(prepared)
    done = np.flatnonzero(arrays[data.STATUS] == data.DONE)
    moments, label, image = dataset[9]
    assert torch.equal(moments, torch.from_numpy(arrays[data.MOMENTS][done[9]])) and label == 2
    assert torch.equal(image, torch.from_numpy(arrays[data.IMAGES][done[9]]))
    copy = pickle.loads(pickle.dumps(dataset))  # as a spawned DataLoader worker receives it: without the maps
    assert copy._arrays is None and len(pickle.dumps(dataset)) < 10_000
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(copy[9], dataset[9]))
    batch = next(iter(torch.utils.data.DataLoader(PreparedDataset(prepared), batch_size=4, num_workers=2)))
    assert len(batch) == 2 and batch[0].shape == (4, 8, 2, 2) and batch[1].tolist() == [0, 0, 0, 0]


def test_an_interrupted_preparation_continues_to_the_same_result(prepared, image_tree, sd_vae, tmp_path,
                                                                   monkeypatch):
    calls = []

    def interrupted_encode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C while encoding the third batch
            raise KeyboardInterrupt
        return encode_images(*args, **kwargs)

    out = tmp_path / "in16"
    monkeypatch.setattr(data, "encode_images", interrupted_encode)
    with pytest.raises(KeyboardInterrupt):
        data.main(prepare_args(image_tree, sd_vae[1], out))
    status = np.load(out / data.STATUS)
    assert (status != data.PENDING).sum() == 6 and (status[6:] == data.PENDING).all()  # two batches of 3 done
    with pytest.raises(UserError, match="only partly prepared"):
        PreparedDataset(out)
    calls.clear()
    monkeypatch.setattr(data, "encode_images", lambda *a, **k: calls.append(1) or encode_images(*a, **k))
    data.main(prepare_args(image_tree, sd_vae[1], out))
    assert len(calls) == 2  # only the two batches (of four) that were not written
    for name, array in read_arrays(prepared).items():
        np.testing.assert_array_equal(read_arrays(out)[name], array, err_msg=name)


@pytest.mark.parametrize("change, refused", [({"image_size": 32}, "image_size: 16 there, 32 now"),
                                             ({"images": False}, "images: True there, False now"),
                                             ({"batch_size": 4}, "batch_size: 3 there, 4 now"),
                                             ({"bf16": True}, "bf16: False there, True now")])
def test_a_folder_of_other_settings_is_refused(prepared, image_tree, sd_vae, change, refused):
    with pytest.raises(ValueError, match=f"other settings.*{refused}"):
        data.main(prepare_args(image_tree, sd_vae[1], prepared, **change))


def test_a_folder_of_other_vae_weights_or_images_is_refused(prepared, image_tree, sd_vae, tmp_path):
    write_safetensors(sd_vae[0].state_dict(), tmp_path / "diffusion_pytorch_model.safetensors",
                      metadata={"note": "the same weights in another file"})
    with pytest.raises(ValueError, match="other settings.*vae_sha256"):
        data.main(prepare_args(image_tree, tmp_path, prepared))
    fewer = tmp_path / "tree"
    shutil.copytree(image_tree, fewer)
    (fewer / "n02_zebra" / "0.JPEG").unlink()
    with pytest.raises(ValueError, match="other settings.*num_images: 11 there, 10 now.*files_sha256"):
        data.main(prepare_args(fewer, sd_vae[1], prepared))


def test_preparation_refuses_bad_inputs(prepared, image_tree, sd_vae, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("")
    with pytest.raises(ValueError, match="not a prepared dataset"):
        data.main(prepare_args(image_tree, sd_vae[1], tmp_path / "mine"))
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (S, S)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(UserError, match="class folder"):
        data.main(prepare_args(tmp_path / "flat", sd_vae[1], tmp_path / "out"))
    with pytest.raises(ValueError, match="multiple of 8"):
        data.main(prepare_args(image_tree, sd_vae[1], tmp_path / "out", image_size=20))
    with pytest.raises(UserError, match="not a prepared dataset"):
        PreparedDataset(tmp_path / "mine")
    (tmp_path / "leftover").mkdir()  # a run stopped while creating its folder is started again, not refused
    temporary_path(tmp_path / "leftover" / data.METADATA).write_text("{")
    data.main(prepare_args(image_tree, sd_vae[1], tmp_path / "leftover", images=False))
    assert len(PreparedDataset(tmp_path / "leftover")) == 10


def test_open_dataset_names_the_builtin_set_or_a_prepared_folder(prepared):
    shapes = data.open_dataset(data.BUILTIN_DATA, images=True, builtin_num_images=20, builtin_image_size=16, seed=5)
    assert isinstance(shapes, ShapesDataset) and len(shapes) == 20 and shapes.input_shape == (3, 16, 16)
    assert torch.equal(shapes[7][2], ShapesDataset(20, 16, seed=5, images=True)[7][2])
    folder = data.open_dataset(str(prepared), images=True)
    assert isinstance(folder, PreparedDataset) and len(folder) == 10 and len(folder[0]) == 3


def test_weights_are_checked_before_the_folder_is_created(prepared, image_tree, sd_vae, tmp_path):
    (tmp_path / "README.md").write_text("# not weights\n")
    with pytest.raises(UserError, match=f"{tmp_path / 'README.md'} is not SD-VAE weights"):
        data.main(prepare_args(image_tree, tmp_path / "README.md", tmp_path / "in16"))
    assert not (tmp_path / "in16").exists()
    data.main(prepare_args(image_tree, sd_vae[1], tmp_path / "in16"))  # the rerun with the right weights
    for name, array in read_arrays(prepared).items():
        np.testing.assert_array_equal(read_arrays(tmp_path / "in16")[name], array, err_msg=name)


def test_a_full_disk_names_the_file_leaves_no_temporary_and_the_rerun_continues(image_tree, sd_vae, small_disk):
    out = small_disk / "in64"  # 64 px: 11 images of 12 KiB (+ 2 KiB of moments), not all of which fit in 80 KiB
    with open(small_disk / "ballast", "wb", buffering=0) as ballast, pytest.raises(OSError):  # fill the disk
        while True:
            ballast.write(bytes(4096))
    with pytest.raises(UserError, match=f"^no space left while writing {out / data.FILES}$"):
        data.main(prepare_args(image_tree, sd_vae[1], out, image_size=64))
    assert list(out.iterdir()) == []  # nothing created is left behind
    os.truncate(small_disk / "ballast", (small_disk / "ballast").stat().st_size - 80 * 1024)
    with pytest.raises(UserError, match=f"^no space left while writing {out}/(moments|images).npy; the batches "
                                        f"written so far are kept"):
        data.main(prepare_args(image_tree, sd_vae[1], out, image_size=64))
    status = np.load(out / data.STATUS)
    assert 0 < (status != data.PENDING).sum() < len(status)  # a part fitted
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    (small_disk / "ballast").unlink()
    data.main(prepare_args(image_tree, sd_vae[1], out, image_size=64))
    assert len(PreparedDataset(out)) == 10


def test_a_user_error_is_one_line_from_the_script(image_tree, tmp_path):
    result = subprocess.run([sys.executable, "data.py", "--data-path", str(image_tree), "--out", str(tmp_path / "o"),
                             "--image-size", "20"], cwd=Path(__file__).parent, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr == "error: --image-size must be a multiple of 8 (the VAE's downsampling)\n"


def test_a_folder_without_images_cannot_serve_them(image_tree, sd_vae, tmp_path):
    data.main(prepare_args(image_tree, sd_vae[1], tmp_path / "noimg", images=False))
    assert not (tmp_path / "noimg" / data.IMAGES).exists()
    assert len(PreparedDataset(tmp_path / "noimg")[0]) == 2
    with pytest.raises(ValueError, match="--no-images"):
        PreparedDataset(tmp_path / "noimg", images=True)


def test_two_ranks_under_torchrun_give_the_one_process_result(prepared, image_tree, sd_vae, tmp_path):
    out = tmp_path / "in16"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "data.py",
               "--data-path", str(image_tree), "--out", str(out), "--image-size", str(S), "--vae", str(sd_vae[1]),
               "--batch-size", "3", "--num-workers", "0"]
    # as many threads as this process: CPU convolutions with another thread count may round differently
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped unreadable image" in result.stdout + result.stderr
    assert "rank 0: 2 of 4 pending batches" in result.stdout and "rank 1: 2 of 4 pending batches" in result.stdout
    for name, array in read_arrays(prepared).items():
        np.testing.assert_array_equal(read_arrays(out)[name], array, err_msg=name)
