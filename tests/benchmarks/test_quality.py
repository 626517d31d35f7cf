"""The quality benchmark (benchmarks/quality/): its metrics against hand-computed values, and the whole
harness (teacher training, control, students, metrics, report) in --tiny mode on the CPU."""

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality import core, evaluate, fid, layer_fit, train_teacher  # noqa: E402


def write_jpeg_archive(path: Path, count: int, seed: int) -> np.ndarray:
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    blobs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buffer.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    labels = (np.arange(count) % 10).astype(np.uint8)
    np.savez(path, data=np.concatenate(blobs), offsets=offsets, labels=labels, classes=np.array(["c"] * 10))
    return labels


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar")
    write_jpeg_archive(folder / "train_jpeg.npz", 64, 0)
    write_jpeg_archive(folder / "test_jpeg.npz", 24, 1)
    return folder


def test_decode_subset_is_fixed_and_keeps_labels(cifar_like, tmp_path):
    images, labels = core.decode_split(cifar_like / "train_jpeg.npz")
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [i % 10 for i in range(64)]
    core.subset_archive(cifar_like / "train_jpeg.npz", tmp_path / "sub.npz", 20, seed=3)
    sub_images, sub_labels = core.decode_split(tmp_path / "sub.npz")
    again_images, again_labels = core.decode_split(cifar_like / "train_jpeg.npz", 20, seed=3)
    assert torch.equal(sub_images, again_images) and torch.equal(sub_labels, again_labels)
    with pytest.raises(ValueError, match="count"):
        core.decode_split(cifar_like / "train_jpeg.npz", 65)


def test_frechet_distance_of_gaussians_matches_the_formula():
    mu_a, mu_b = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([2.0, 1.0], dtype=torch.float64)
    cov_a = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    cov_b = torch.diag(torch.tensor([1.0, 9.0], dtype=torch.float64))
    # diagonal: |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2 = 4 + (2 - 1)^2 + (1 - 3)^2
    assert fid.frechet_distance((mu_a, cov_a), (mu_b, cov_b)) == pytest.approx(9.0, abs=1e-9)
    feats = torch.randn(500, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert fid.frechet_distance(fid.statistics(feats), fid.statistics(feats)) == pytest.approx(0.0, abs=1e-8)


def test_kid_sees_a_shift_and_psnr_matches_hand_value():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(400, 16, dtype=torch.float64, generator=generator)
    b = torch.randn(400, 16, dtype=torch.float64, generator=generator)
    same = fid.kernel_inception_distance(a, b, subsets=10, subset_size=200)
    shifted = fid.kernel_inception_distance(a, b + 1.0, subsets=10, subset_size=200)
    assert abs(same) < 0.05 < shifted
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    y = x.clone()
    y[0] += 10  # mse 100 -> 10 log10(255^2 / 100); image 1 identical -> capped by the 1e-10 floor
    expected = (10 * math.log10(255**2 / 100) + 10 * math.log10(255**2 / 1e-10)) / 2
    assert fid.paired_psnr(x, y) == pytest.approx(expected)
    with pytest.raises(ValueError, match="one shape"):
        fid.paired_psnr(x, y[:1])


def test_heldout_loss_is_reproducible_and_control_removes_self_attention(cifar_like):
    torch.manual_seed(0)
    model = core.ClassConditionedUNet(core.TINY_CONFIG).eval()
    images, labels = core.decode_split(cifar_like / "test_jpeg.npz")
    first = core.heldout_loss(model, images, labels, draws=2, batch=10)
    assert first == core.heldout_loss(model, images, labels, draws=2, batch=10)
    control, params = evaluate.make_control(model)
    assert {id(p) for p in params} == {id(p) for p in control.unet.parameters()}
    calls = []
    for layer in evaluate.self_attention_layers(control.unet):
        control.unet.get_submodule(layer).register_forward_hook(lambda m, a, o: calls.append(o.abs().max().item()))
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), torch.tensor([1, 10])
    with torch.no_grad():
        assert not torch.allclose(control(x, t, y), model(x, t, y))
    assert calls and max(calls) == 0.0


def test_whole_harness_tiny(cifar_like, tmp_path):
    teacher_dir = train_teacher.main(["--data", str(cifar_like), "--out", str(tmp_path / "teacher"), "--tiny"])
    log = json.loads((teacher_dir / "train_log.json").read_text())
    assert log["steps"] == 3
    common = ["--teacher", str(teacher_dir), "--data", str(cifar_like), "--out", str(tmp_path / "eval"), "--tiny"]
    # as on the GPU: the models in separate runs (there, parallel processes), then the report of all rows
    first = evaluate.main(common + ["--models", "default,teacher"])
    assert [row["model"] for row in first["rows"]] == ["teacher", "student:default"]
    assert "gap_recovered" not in first["rows"][1]  # no control yet
    evaluate.main(common + ["--models", "no_feature,control"])
    result = evaluate.main(common + ["--models", ""])
    names = [row["model"] for row in result["rows"]]
    assert names == ["teacher", "control", "student:default", "student:no_feature"]
    default = result["rows"][2]
    assert default["train"]["layerwise_steps"] == 1 and default["train"]["steps"] == 2
    for row in result["rows"]:
        assert math.isfinite(row["heldout_loss"]) and math.isfinite(row["fid"]) and math.isfinite(row["kid"])
    teacher_loss, control_loss = result["rows"][0]["heldout_loss"], result["rows"][1]["heldout_loss"]
    assert result["rows"][1]["gap_recovered"] == pytest.approx(0.0)
    assert default["gap_recovered"] == pytest.approx(
        (control_loss - default["heldout_loss"]) / (control_loss - teacher_loss))
    assert all("psnr_vs_teacher" in row and "fid_vs_teacher" in row for row in result["rows"][1:])
    saved = json.loads((tmp_path / "eval" / "quality.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    table = (tmp_path / "eval" / "quality.md").read_text()
    assert table.count("\n| ") == 4 and "student:no_feature" in table
    with pytest.raises(SystemExit):
        evaluate.parse_args(common + ["--models", "teacher,nonsense"])
    with pytest.raises(SystemExit):
        evaluate.parse_args(common + ["--steps", "0"])


def test_a_step_budget_trains_every_model_that_many_steps(cifar_like, tmp_path):
    teacher_dir = train_teacher.main(["--data", str(cifar_like), "--out", str(tmp_path / "teacher"), "--tiny"])
    result = evaluate.main(["--teacher", str(teacher_dir), "--data", str(cifar_like), "--out", str(tmp_path / "eval"),
                            "--tiny", "--models", "control,no_feature,default", "--steps", "10", "--minutes", "60"])
    trained = {row["model"]: row["train"] for row in result["rows"]}
    assert {name: run["steps"] for name, run in trained.items()} == {
        "control": 10, "student:default": 10, "student:no_feature": 10}
    # the layerwise stage takes the first 10% of the steps: step 0 only (progress 0 / 10)
    assert trained["student:default"]["layerwise_steps"] == 1 and trained["student:no_feature"]["layerwise_steps"] == 0
    assert result["meta"]["steps_per_model"] == 10


def test_teacher_training_continues_from_a_saved_teacher(cifar_like, tmp_path):
    first = train_teacher.main(["--data", str(cifar_like), "--out", str(tmp_path / "a"), "--tiny"])
    saved = core.load_model(first, "cpu")
    second = train_teacher.main(["--data", str(cifar_like), "--init", str(first), "--out", str(tmp_path / "b"),
                                 "--tiny"])
    log = json.loads((second / "train_log.json").read_text())
    assert log["steps"] == 6 and [run["steps"] for run in log["runs"]] == [3, 3]
    continued = core.load_model(second, "cpu")
    # the continued run starts from the saved weights: after 3 small steps it is near them, not a fresh init
    fresh = core.ClassConditionedUNet(json.loads((first / "config.json").read_text()))
    start, moved, other = (torch.cat([p.flatten() for p in m.parameters()]) for m in (saved, continued, fresh))
    assert (moved - start).norm() < 0.1 * (other - start).norm()


def test_ema_tracks_parameters_with_warm_up():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = core.EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # decay min(0.9, 2/11): shadow = 1 + (3 - 1) * (1 - 2/11)
    ema.copy_to(model)
    assert model.weight.detach().flatten().tolist() == pytest.approx([1 + 2 * 9 / 11] * 2)


def test_teacher_attention_heads_are_32_channels_wide():
    # UNet2DConditionModel reads attention_head_dim as a head count: 32 "heads" of 64 channels are 2 wide.
    model = core.ClassConditionedUNet(core.TEACHER_CONFIG)
    widths = {name: module.inner_dim // module.heads for name, module in model.unet.named_modules()
              if name.endswith(("attn1", "attn2"))}
    assert len(widths) == 14 and set(widths.values()) == {core.TEACHER_HEAD_CHANNELS}


def test_layer_fit_records_each_attention_and_reports_every_ratio(cifar_like, tmp_path, capsys):
    teacher_dir = train_teacher.main(["--data", str(cifar_like), "--out", str(tmp_path / "teacher"), "--tiny"])
    teacher = core.load_model(teacher_dir, "cpu").eval().requires_grad_(False)
    images, labels = core.decode_split(cifar_like / "train_jpeg.npz", 6)
    inputs, outputs = layer_fit.record_attention(teacher, images, labels, seed=0, batch=4)
    assert list(inputs) == evaluate.self_attention_layers(teacher.unet)
    for layer, tokens in inputs.items():  # the recorded output is the layer's own, batch by batch
        assert tokens.shape[0] == 6
        with torch.no_grad():
            torch.testing.assert_close(teacher.unet.get_submodule(layer)(tokens), outputs[layer])
    test_images, test_labels = core.decode_split(cifar_like / "test_jpeg.npz", 4)
    unfitted = layer_fit.fit(teacher, inputs, outputs, 8, steps=0, lr=1e-2, seed=0, test_images=test_images,
                             test_labels=test_labels)
    assert unfitted["layer_error_fit"] == unfitted["layer_error_init"]
    assert unfitted["heldout_fit"] == unfitted["heldout_init"]
    fitted = layer_fit.fit(teacher, inputs, outputs, 8, steps=3, lr=1e-2, seed=0, test_images=test_images,
                           test_labels=test_labels)
    assert fitted["layer_error_init"] == unfitted["layer_error_init"] and fitted["heldout_fit"] != unfitted["heldout_fit"]
    result = layer_fit.main(["--teacher", str(teacher_dir), "--data", str(cifar_like), "--tiny", "--ratios", "8", "2"])
    assert [row["proxy_ratio"] for row in result["rows"]] == [8, 2]
    assert result["rows"][1]["proxy_widths"] == [8, 16]  # widths 16, 16, 32 of the tiny model, halved
    printed = capsys.readouterr().out
    assert printed.count("\n| 8 |") == 1 and printed.count("\n| 2 |") == 1
