import random

import numpy as np
import pytest
import torch
from PIL import Image

from mcteach.measure import judge as J
from mcteach.world import regions, scenes

E = scenes.EMOJI


@pytest.fixture(scope="module")
def judge():
    return J.Judge.load()


def test_labels_cover_every_class_unrecognisable_and_nothing(judge):
    assert judge.labels == J.LABELS
    assert len(judge.labels) == len(scenes.BASE_CLASSES) + len(scenes.HELDOUT_CONCEPTS) + 2
    assert judge.labels[-2:] == [J.UNRECOGNISABLE, "nothing"]


def test_accuracy_on_fresh_renders(judge):
    """~100 crops from the "test" stream: seeds the training stream never used."""
    images, positions, labels = J.batch("test", 0, 0, 100)
    pred = judge.probs(images, positions).argmax(-1)
    assert (pred == labels).float().mean() >= 0.9
    assert set(positions) == set(regions.POSITIONS)
    # blurred, noisy, shifted like a generator's output
    blurred = J.augment(images, torch.Generator().manual_seed(0))
    assert (judge.probs(blurred, positions).argmax(-1) == labels).float().mean() >= 0.85


def test_empty_background_is_nothing(judge):
    blank = Image.new("RGB", (64, 64), (200, 220, 240))
    for pos in regions.POSITIONS:
        assert judge.classify(blank, pos)[0] == "nothing"
    scene = scenes.render_scene([(E["cat"], "top")], seed=3)
    assert judge.classify(scene.image, "bottom")[0] == "nothing"


def test_two_object_scene(judge):
    scene = scenes.render_scene([(E["fox"], "left"), (E["red apple"], "right")], seed=12345)
    label, p = judge.classify(scene.image, "left")
    assert label == "fox" and p > 0.5
    assert judge.classify(scene.image, "right")[0] == "red apple"


def test_probs_shape_sum_and_input_types_agree(judge):
    drawn = [scenes.random_scene(10_000 + i) for i in range(4)]
    pil = [s.image for s in drawn]
    tensor = torch.from_numpy(np.stack([np.asarray(im, np.float32) / 255 for im in pil])).permute(0, 3, 1, 2)
    positions = ["left", "top", "centre", "right"]
    a, b = judge.probs(pil, positions), judge.probs(tensor, positions)
    assert a.shape == (4, len(judge.labels))
    torch.testing.assert_close(a.sum(-1), torch.ones(4))
    torch.testing.assert_close(a, b)
    # one str for all positions == the list; batching by position == one image at a time
    torch.testing.assert_close(judge.probs(pil, "left"), judge.probs(pil, ["left"] * 4))
    torch.testing.assert_close(a[2], judge.probs([pil[2]], "centre")[0], atol=1e-5, rtol=1e-4)


def test_bad_inputs_raise_helpful_errors(judge):
    image = scenes.random_scene(0).image
    with pytest.raises(ValueError, match="unknown region"):
        judge.probs([image], "middle")
    with pytest.raises(ValueError, match="64x64"):
        judge.classify(image.resize((32, 32)), "left")
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        judge.probs(torch.rand(2, 3, 32, 32), "left")
    with pytest.raises(ValueError, match="2 images but 3 positions"):
        judge.probs([image, image], ["left", "right", "top"])


def test_missing_file_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="mcteach judge train"):
        J.Judge.load(tmp_path / "nope.safetensors")


def test_save_load_roundtrip_in_fp16(tmp_path):
    torch.manual_seed(0)
    net = J.Judge(widths=(8, 16)).eval()
    net.save(tmp_path / "j.safetensors")
    loaded = J.Judge.load(tmp_path / "j.safetensors")
    assert loaded.widths == (8, 16) and loaded.labels == J.LABELS
    assert next(loaded.parameters()).dtype == torch.float32
    x = torch.rand(2, 3, 64, 64)
    expected = net.half().float().probs(x, "top")
    torch.testing.assert_close(loaded.probs(x, "top"), expected, atol=1e-3, rtol=1e-2)


def test_crops_have_native_region_shapes():
    seen = {}

    class Spy(J.Judge):
        def forward(self, crops):
            seen[tuple(crops.shape[2:])] = True
            return super().forward(crops)

    Spy(widths=(8,)).eval().region_logits(torch.rand(5, 3, 64, 64), list(regions.POSITIONS))
    assert set(seen) == {(64, 32), (32, 64), (64, 64)}


def test_sample_example_is_deterministic_and_nothing_means_an_empty_region():
    a, b = J.sample_example(random.Random(7)), J.sample_example(random.Random(7))
    assert a[1:] == b[1:] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    images, positions, labels = J.batch("train", 0, 0, 200)
    assert images.shape == (200, 3, 64, 64) and set(positions) == set(regions.POSITIONS)
    nothing = J.LABELS.index("nothing")
    assert 5 < (labels == nothing).sum() < 50
    for image, pos, label in zip(images, positions, labels):
        x0, y0, x1, y1 = regions.region_box(pos, 64)
        empty = image[:, y0:y1, x0:x1].flatten(1).std(1).max() == 0  # one flat colour
        assert empty == (label == nothing)


def test_augment_keeps_range_and_blur_with_zero_sigma_is_identity():
    x = torch.rand(3, 3, 64, 64)
    torch.testing.assert_close(J.gaussian_blur(x, torch.zeros(3)), x)
    blurred = J.gaussian_blur(x, torch.full((3,), 1.2))
    assert blurred.std() < x.std() / 2
    torch.testing.assert_close(blurred.mean(), x.mean(), atol=1e-2, rtol=0)
    y = J.augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    torch.testing.assert_close(y, J.augment(x, torch.Generator().manual_seed(0)))


def test_a_judge_for_the_broad_world_trains_on_its_own_labels():
    from mcteach.measure import judge as J
    from mcteach.world import scenes

    labels = J.labels_for(scenes.BROAD_CLASSES)
    assert len(labels) == len(scenes.BROAD_CLASSES) + len(scenes.HELDOUT_CONCEPTS) + 2 and labels[-1] == J.NOTHING
    assert J.UNRECOGNISABLE in labels and labels == J.LABELS  # the shipped model's world
    assert J.UNRECOGNISABLE not in J.labels_for(scenes.CLASSIC_CLASSES, unrecognisable=False)  # the first judge's
    images, positions, targets = J.batch("train", 0, 0, 16, labels)
    assert images.shape == (16, 3, 64, 64) and int(targets.max()) < len(labels)
    # the default stream is the shipped judge's labels
    assert torch.equal(J.batch("eval", 0, 0, 8)[2], J.batch("eval", 0, 0, 8, J.LABELS)[2])
    small = J.train(steps=2, batch_size=8, labels=labels)
    assert small.labels == labels and small.head.out_features == len(labels)


@pytest.mark.parametrize("kind", sorted(set(J.BLOB_KINDS)))
def test_every_blob_kind_is_a_deterministic_defaced_render(kind):
    """An "unrecognisable" example keeps a render's colours in its region but not its shape."""
    for position in ("centre", "left", "bottom"):
        a = J.blob(scenes.BROAD_CLASSES, position, random.Random(3), kind)
        b = J.blob(scenes.BROAD_CLASSES, position, random.Random(3), kind)
        assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))
        x = np.asarray(a, dtype=np.float32)
        x0, y0, x1, y1 = regions.region_box(position, 64)
        assert x[y0:y1, x0:x1].std() > 5  # something is there, not a blank background
    with pytest.raises(ValueError, match="unknown blob kind"):
        J.blob(scenes.BROAD_CLASSES, "centre", random.Random(0), "melt")


def test_a_judge_with_the_unrecognisable_label_sees_blobs_in_its_stream():
    labels = J.labels_for(scenes.BROAD_CLASSES)
    _, _, targets = J.batch("train", 0, 0, 300, labels)
    share = float((targets == labels.index(J.UNRECOGNISABLE)).float().mean())
    assert 0.05 < share < 0.16  # p_blob = 0.1
    assert J.category(J.UNRECOGNISABLE) == J.UNRECOGNISABLE


def test_a_failure_bank_holds_unfinished_generations_and_feeds_the_unrecognisable_label():
    """Two DDIM steps of 25 leave a class's colours in no shape: the generator's own failures, as negatives."""
    bank = J.failure_bank(None, n=2, steps=2)  # the embedded model
    assert bank.shape == (2, 3, 64, 64) and bank.dtype == torch.uint8
    finished = J.failure_bank(None, n=2, steps=25)
    assert not torch.equal(bank, finished)
    left = np.asarray(J.failure_example(bank, "left", random.Random(0)), dtype=int)
    assert left[:, 32:].std(axis=(0, 1)).max() == 0  # shrunk into the left half: the right half is plain
    labels = J.labels_for(scenes.BROAD_CLASSES)
    unrec = labels.index(J.UNRECOGNISABLE)
    with_bank = J.batch("train", 0, 0, 200, labels, failures=bank)[2]
    without = J.batch("train", 0, 0, 200, labels)[2]
    assert (with_bank == unrec).sum() == (without == unrec).sum()  # the same share; half of them now from the bank


def test_finetuning_on_labelled_generated_images_moves_the_judge_towards_them():
    """A handful of hand-labelled images (here: blobs labelled unrecognisable) in every batch shift the judge."""
    labels = J.labels_for(scenes.BROAD_CLASSES)
    base = J.train(steps=2, batch_size=8, labels=labels)
    from test_calibration import blob as smooth_blob

    images = [smooth_blob(i) for i in range(4)] + [scenes.render_scene([(scenes.EMOJI["fox"], "left")], seed=0).image]
    regions, said = ["centre"] * 4 + ["left"], [J.UNRECOGNISABLE] * 4 + ["fox"]
    tuned = J.finetune(base, images, regions, said, steps=30, batch_size=16, lr=3e-3)
    unrec = labels.index(J.UNRECOGNISABLE)
    before, after = base.probs(images[:4], "centre")[:, unrec], tuned.probs(images[:4], "centre")[:, unrec]
    assert after.mean() > before.mean() + 0.1
    assert tuned.labels == base.labels and base is not tuned
    with pytest.raises(ValueError, match="none of the labels"):
        J.finetune(base, images[:1], ["centre"], ["a label it lacks"], steps=1)


def test_a_grey_judge_sees_only_the_luminance_and_pairs_with_a_colour_judge(tmp_path):
    """The shipped judge is a pair: a colour judge and a grey one (luminance only), their log-probabilities added."""
    torch.manual_seed(0)
    colour, grey = J.Judge(widths=(8, 16)).eval(), J.Judge(widths=(8, 16), grey=True).eval()
    x = torch.rand(3, 3, 64, 64)
    luma = (x * torch.tensor(J.LUMA)[:, None, None]).sum(1, keepdim=True).expand(-1, 3, -1, -1)
    torch.testing.assert_close(grey.pool(x), grey.pool(luma))  # colours with the same luminance look alike to it
    assert not torch.allclose(colour.pool(x), colour.pool(luma))
    pair = colour.with_shape(grey)
    expected = colour(x).log_softmax(-1) + grey(x).log_softmax(-1)
    torch.testing.assert_close(pair(x), expected)
    assert pair.labels_of(x) == [pair.labels[int(i)] for i in expected.argmax(-1)]
    assert colour.shape is None and pair.shape is not grey  # copies: the halves are left as they were
    # kept in one file, both halves and the weight
    pair2 = colour.with_shape(grey, 0.5)
    pair2.save(tmp_path / "pair.safetensors")
    loaded = J.Judge.load(tmp_path / "pair.safetensors")
    assert loaded.shape is not None and loaded.shape.grey and loaded.shape_weight == 0.5 and not loaded.grey
    torch.testing.assert_close(loaded.probs(x, "left"), pair2.half().float().probs(x, "left"), atol=1e-3, rtol=1e-2)
    # what cannot be paired, or fine-tuned as a pair, says so
    with pytest.raises(ValueError, match="grey judge"):
        colour.with_shape(colour)
    with pytest.raises(ValueError, match="same labels"):
        colour.with_shape(J.Judge(J.LABELS[:-1], widths=(8, 16), grey=True))
    with pytest.raises(ValueError, match="is a pair"):
        J.finetune(pair, [Image.new("RGB", (64, 64))], ["centre"], [J.NOTHING], steps=1)


def test_a_pair_imprints_new_concepts_in_both_halves():
    from mcteach.world.concepts import load_concept

    torch.manual_seed(0)
    pair = J.Judge(widths=(8, 16)).eval().with_shape(J.Judge(widths=(8, 16), grey=True).eval())
    koala = load_concept("koala")
    koala.name = "a koala nobody labelled"
    wider = pair.with_concepts([koala], copies=2, negatives=32, steps=5)
    assert wider.labels[-1] == wider.shape.labels[-1] == "a koala nobody labelled"
    assert wider.probs(koala.images[:2], "centre").shape == (2, len(J.LABELS) + 1)


def test_the_shipped_judge_is_a_colour_and_grey_pair(judge):
    assert judge.shape is not None and judge.shape.grey and not judge.grey and judge.shape_weight == 1.0
