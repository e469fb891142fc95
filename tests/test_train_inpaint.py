"""The embedded model's 9-channel inpainting UNet trainer (training/train_inpaint.py), its mask mixture
(training/inpaint_masks.py) and its held-out scoring (training/evaluation.py inpaint_*), on the tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train_vae import optimizer_state

from pipelines.core.inpaint_inputs import cell_pixels, cells_tensor, hole_cells, masked_image, unet_input
from training import evaluation, inpaint_masks, train_inpaint, world


@pytest.fixture(scope="module")
def tiny_unet(tiny_model):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_model.folder / "unet").eval()


def test_the_widened_unet_equals_the_base_exactly_for_any_mask_and_masked_latent(tiny_unet):
    unet = train_inpaint.inpaint_unet_from(tiny_unet).eval()
    assert unet.config.in_channels == 9 and unet.conv_in.weight[:, 4:].abs().sum() == 0
    assert torch.equal(unet.conv_in.bias, tiny_unet.conv_in.bias)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 16, generator=g)
    emb = torch.randn(3, 77, tiny_unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        expected = tiny_unet(x, 500, encoder_hidden_states=emb).sample
        for full in (False, True):
            cells = torch.ones(3, 1, 16, 16) if full else (torch.rand(3, 1, 16, 16, generator=g) > 0.5).float()
            masked = 5 * torch.randn(3, 4, 16, 16, generator=g)
            got = unet(unet_input(x, cells, masked), 500, encoder_hidden_states=emb).sample
            assert torch.equal(got, expected)
    # a 9-channel UNet is continued as it is
    assert train_inpaint.inpaint_unet_from(unet) is unet


def _scenes_with_objects(n):
    return [world.sample_scene(seed, n_objects=1 + seed % 2) for seed in range(n)]


def test_the_mask_mixture_keeps_its_shares_and_every_mask_is_nonempty():
    rng = np.random.default_rng(0)
    scenes = _scenes_with_objects(40)
    kinds = []
    for i in range(2000):
        mask, kind, index = inpaint_masks.sample_mask(rng, scenes[i % len(scenes)])
        assert mask.dtype == bool and mask.shape == (64, 64) and mask.any(), kind
        assert (index is not None) == (kind == "footprint")
        assert mask.all() == (kind == "full")
        kinds.append(kind)
    for kind, share in zip(inpaint_masks.KINDS, inpaint_masks.SHARES):
        assert abs(kinds.count(kind) / len(kinds) - share) < 0.03, kind
    # a scene without objects has no footprint to draw around: boxes instead
    empty = world.sample_scene(3, n_objects=0)
    assert inpaint_masks.sample_mask(rng, empty, "footprint")[1] == "boxes"
    # seeded: the same generator state gives the same masks
    a = [inpaint_masks.sample_mask(np.random.default_rng(5), scenes[1])[0] for _ in range(2)]
    assert np.array_equal(*a)


def test_footprint_masks_are_strictly_larger_than_the_object_and_the_disc_hides_its_shape():
    rng = np.random.default_rng(1)
    for scene in _scenes_with_objects(30):
        for i in range(len(scene.objects)):
            footprint = scene.footprint(i)
            for form in inpaint_masks.FOOTPRINT_FORMS:
                mask = inpaint_masks.object_mask_around(rng, scene, i, form)
                assert (mask >= footprint).all() and mask.sum() > footprint.sum(), form
                # at least the footprint dilated by 2 px: the object's outline is not the mask's
                assert (mask >= inpaint_masks.dilate(footprint, 2)).all(), form
    # the disc depends on the object's bounding circle only: a star and a circle of one size get the same mask
    star = world.SceneObject("star", "red", "large", "centre", (32.0, 32.0), world.SIZES["large"] * 64)
    circle = world.SceneObject("circle", "red", "large", "centre", (32.0, 32.0), world.SIZES["large"] * 64)
    masks = [inpaint_masks.object_mask_around(np.random.default_rng(2), world.Scene(64, world.Background(
        "solid", ("white",)), (obj,)), 0, "disc") for obj in (star, circle)]
    assert np.array_equal(*masks)


def test_boxes_strokes_and_cells_stay_in_their_ranges():
    rng = np.random.default_rng(3)
    for _ in range(200):
        box = inpaint_masks.boxes_mask(rng)
        ys, xs = np.nonzero(box)
        assert 8 <= ys.max() - ys.min() + 1 <= 64 and 8 <= xs.max() - xs.min() + 1 <= 64
        assert 64 <= box.sum() <= 3 * 40 * 40
        stroke = inpaint_masks.strokes_mask(rng)
        assert stroke.any() and stroke.mean() < 0.8
        cells = inpaint_masks.cells_mask(rng)
        # whole grid cells: each third is all in or all out
        blocks = {(r, c): cells[r * 21 + 5, c * 21 + 5] for r in range(3) for c in range(3)}
        assert 1 <= sum(blocks.values()) <= 3
        for (r, c), on in blocks.items():
            part = cells[round(64 * r / 3):round(64 * (r + 1) / 3), round(64 * c / 3):round(64 * (c + 1) / 3)]
            assert part.all() if on else not part.any()


def test_removal_samples_blank_the_removed_object_and_captions_are_training_ones():
    cases = []
    for source, target, mask, text, case in train_inpaint.sample_stream(80, seed=0, remove_share=0.5):
        cases.append(case)
        assert not world.is_held_out_prompt(text)
        cells = cells_tensor(hole_cells(mask, 4))
        a = masked_image(torch.from_numpy(source).permute(2, 0, 1)[None].float() / 127.5 - 1, cells, 4)
        b = masked_image(torch.from_numpy(world.render(target)).permute(2, 0, 1)[None].float() / 127.5 - 1, cells, 4)
        if case == "remove":
            assert not np.array_equal(source, world.render(target))  # the input still shows the object
        # under the mask the input and the target agree pixel for pixel: the hole hides every trace of the edit
        assert torch.equal(a, b)
    assert 0.3 < cases.count("remove") / len(cases) < 0.7 and len(set(cases)) >= 4


def test_masked_latents_encode_the_image_blanked_to_mid_gray_over_the_hole(tiny_model):
    vae = tiny_model.vae
    images = np.stack([world.render(world.sample_scene(s)) for s in range(2)])
    cells = np.zeros((2, 16, 16), bool)
    cells[0, 4:8, 2:10] = True
    cells[1] = True
    got = evaluation.masked_latents(vae, images, cells)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    hole = cell_pixels(cells_tensor(cells), 4)
    x = torch.where(hole.bool().expand_as(x), torch.zeros_like(x), x)
    with torch.no_grad():
        expected = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got[0], evaluation.encode(vae, images[:1])[0])


def test_inpaint_scoring_reads_the_edit_inside_the_hole():
    from pipelines.core.masks import cells_to_image

    for kind in evaluation.INPAINT_KINDS:
        for scene, edit, mask in evaluation.held_out_inpaints(4, kind):
            obj = (edit.scene if kind == "insert" else scene).objects[edit.index]
            assert mask[round(obj.centre[1]), round(obj.centre[0])]
            hole = cells_to_image(hole_cells(mask, 4), 4).astype(bool)
            truth = evaluation.score_inpaint(world.render(edit.scene), scene, edit, hole, kind)
            assert truth["success"] and truth["psnr_outside"] == 100.0, kind
            # leaving the input as it is fails every kind (nothing inserted, recoloured or removed)
            assert not evaluation.score_inpaint(world.render(scene), scene, edit, hole, kind)["success"], kind
    with pytest.raises(ValueError, match="unknown inpainting kind"):
        evaluation.held_out_inpaints(1, "reshape")


def test_gray_backgrounds_are_drawn_more_often():
    gray = torch.tensor([1, 0, 0, 0], dtype=torch.uint8)
    p = train_inpaint.draw_weights(gray, 2.0)
    assert p[0] == pytest.approx(0.4) and p[1:] == pytest.approx([0.2] * 3)
    assert train_inpaint.draw_weights(gray, 1.0) is None


@pytest.mark.slow
def test_inpaint_run_checkpoints_resumes_and_exports_a_loadable_9_channel_folder(tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "inpaint"
    argv = ["--base", str(tiny_model.folder), "--out", str(out), "--threads", "1", "--batch", "4",
            "--samples", "16", "--eval-count", "1", "--eval-steps", "2", "--eval-every", "2",
            "--checkpoint-every", "2", "--no-progress"]
    with torch.random.fork_rng():
        train_inpaint.main([*argv, "--steps", "2"])
        first = load_file(out / "checkpoint" / "model.safetensors")
        report = train_inpaint.main([*argv, "--steps", "3", "--resume"])
    assert report["step"] == 3
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and state["models"] == {"unet_inpaint": "model.safetensors"}
    weights = load_file(out / "checkpoint" / "model.safetensors")
    assert weights["conv_in.weight"].shape[1] == 9
    assert weights["conv_in.weight"][:, 4:].abs().sum() > 0 and first["conv_in.weight"][:, 4:].abs().sum() > 0
    assert not torch.equal(first["conv_in.weight"], weights["conv_in.weight"])  # the resumed step trained
    optimizer = optimizer_state(out)
    assert {float(v["step"]) for v in optimizer["state"].values()} == {3.0}
    rest, conv_in = optimizer["param_groups"]
    assert len(conv_in["params"]) == 2 and conv_in["lr"] == pytest.approx(3 * rest["lr"]) and rest["lr"] > 0
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
    assert {"insert_success", "recolour_success", "remove_psnr_outside"} <= set(rows[-1])
    data = load_file(out / "data" / "inpaint.safetensors")
    assert data["target"].shape == data["masked"].shape == (16, 4, 16, 16) and data["cells"].shape == (16, 16, 16)

    folder = out / "unet_inpaint"
    unet = UNet2DConditionModel.from_pretrained(folder)
    stored = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert unet.config.in_channels == 9 and {t.dtype for t in stored.values()} == {torch.float16}
    assert {p.name for p in folder.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors", "inpaint.json"}
    record = json.loads((folder / "inpaint.json").read_text())
    assert record["steps"] == 3 and record["mask_mixture"]["full"] == 0.25
    assert record["quick_look"]["insert_success"] == rows[-1]["insert_success"]
    # the export is the EMA weights (not the last step's), in float16
    assert not torch.equal(stored["conv_in.weight"], weights["conv_in.weight"].half())
    # a 9-channel folder is continued as it is
    again = train_inpaint.main([*argv, "--out", str(tmp_path / "more"), "--steps", "1", "--eval-count", "0",
                                "--init-unet", str(folder), "--data-dir", str(out / "data")])
    assert again["step"] == 1 and not (tmp_path / "more" / "data").exists()
