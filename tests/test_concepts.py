import json
import warnings

import numpy as np
import pytest
from PIL import Image

from mcteach.world import regions, scenes
from mcteach.world.concepts import CONCEPTS_DIR, ConceptError, list_concepts, load_concept, make_concept_sets

BASE_NAMES = {e.name for e in scenes.BASE_CLASSES}


def test_every_held_out_concept_is_shipped():
    assert list_concepts() == sorted(scenes.HELDOUT_CONCEPTS)


@pytest.mark.parametrize("slug", sorted(scenes.HELDOUT_CONCEPTS))
def test_shipped_set(slug):
    c = load_concept(slug)
    emoji, class_word = scenes.HELDOUT_CONCEPTS[slug]
    assert (c.slug, c.name, c.class_word, c.category) == (
        slug, emoji.name, class_word, emoji.category
    )
    assert emoji.chars not in {e.chars for e in scenes.BASE_CLASSES}
    assert c.class_word in scenes.EMOJI and c.class_word in BASE_NAMES
    assert 4 <= len(c) <= 8 and len(c.masks) == len(c.captions) == len(c)
    for im, mask, cap in zip(c.images, c.masks, c.captions):
        assert im.mode == "RGB" and im.size == (64, 64)
        assert mask.dtype == np.float32 and mask.shape == (64, 64)
        assert 0.0 <= mask.min() and mask.max() == 1.0
        assert mask.mean() > 0.03  # thin objects (trumpet) in a half cover ~4-6%
        # the mask is exactly the object: outside it, only the plain background
        outside = np.asarray(im)[mask == 0]
        assert (outside == outside[0]).all()
        assert cap.startswith(f"a {c.name}")
    assert 0.05 < np.mean(c.masks) < 0.6
    positions = {entry["position"] for entry in _meta(slug)["images"]}
    assert positions == set(regions.POSITIONS)


def _meta(slug):
    return json.loads((CONCEPTS_DIR / slug / "concept.json").read_text(encoding="utf-8"))


def test_concept_json_describes_the_emoji():
    meta = _meta("man_with_curly_hair_and_light_skin")
    assert meta["unicode_names"] == [
        "MAN",
        "EMOJI MODIFIER FITZPATRICK TYPE-1-2",
        "ZERO WIDTH JOINER",
        "EMOJI COMPONENT CURLY HAIR",
    ]
    assert meta["images"][1] == {
        "file": "01.png",
        "mask": "01_mask.png",
        "position": "left",
        "caption": "a man with curly hair and light skin on the left",
    }
    assert "Apache-2.0" in meta["license"] and "OFL-1.1" in meta["license"]


def test_make_concept_sets_reproduces_shipped_files(tmp_path):
    folders = make_concept_sets(tmp_path, n=6, seed=0)
    assert sorted(f.name for f in folders) == list_concepts()
    for folder in folders:
        shipped = CONCEPTS_DIR / folder.name
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in shipped.iterdir())
        assert (folder / "concept.json").read_bytes() == (shipped / "concept.json").read_bytes()
        for png in folder.glob("*.png"):  # pixels, not bytes: zlib output may vary by version
            with Image.open(png) as new, Image.open(shipped / png.name) as old:
                assert new.mode == old.mode
                assert np.array_equal(np.asarray(new), np.asarray(old)), png.name


def test_make_concept_sets_n_and_seed(tmp_path):
    make_concept_sets(tmp_path / "a", n=4, seed=1)
    make_concept_sets(tmp_path / "a", n=2, seed=1)  # regenerating with fewer leaves no stale files
    c = load_concept(tmp_path / "a" / "koala")
    assert len(c) == 2
    assert not np.array_equal(np.asarray(c.images[0]), np.asarray(load_concept("koala").images[0]))


def test_mask_files_are_the_alpha():
    mask = Image.open(CONCEPTS_DIR / "koala" / "00_mask.png")
    assert mask.mode == "L"
    assert np.array_equal(np.asarray(mask, np.float32) / 255, load_concept("koala").masks[0])


def test_load_other_size():
    with pytest.warns(UserWarning, match=r"images made 32x32: 00\.png \(64x64: resized\)") as record:
        c = load_concept(CONCEPTS_DIR / "koala", size=32)
    assert len(record) == 1  # one warning per folder, naming every file
    assert all(f"0{i}.png (64x64: resized)" in str(record[0].message) for i in range(6))
    assert c.images[0].size == (32, 32) and c.masks[0].shape == (32, 32)
    assert c.masks[0].dtype == np.float32 and 0 <= c.masks[0].min() and c.masks[0].max() <= 1


# --- a user's own folder ---


def _save(folder, name, im):
    folder.mkdir(exist_ok=True)
    im.save(folder / name)


def test_own_folder_without_json_or_masks(tmp_path):
    folder = tmp_path / "my_dog"
    _save(folder, "a.png", Image.new("RGB", (64, 64), (10, 20, 30)))
    _save(folder, "b.jpg", Image.new("RGB", (64, 64), (200, 0, 0)))
    (folder / "notes.txt").write_text("not an image")
    c = load_concept(folder)
    assert (c.name, c.slug, c.class_word, c.category, c.captions) == (
        "my_dog", "my_dog", None, None, None
    )
    assert len(c) == 2 and np.asarray(c.images[0])[0, 0].tolist() == [10, 20, 30]
    assert all(np.array_equal(m, np.ones((64, 64), np.float32)) for m in c.masks)


def test_mask_beside_image_is_used_not_counted(tmp_path):
    folder = tmp_path / "c"
    _save(folder, "a.png", Image.new("RGB", (64, 64)))
    m = np.zeros((64, 64), np.uint8)
    m[:, :32] = 255
    _save(folder, "a_mask.png", Image.fromarray(m))
    c = load_concept(folder)
    assert len(c) == 1
    assert c.masks[0][:, :32].min() == 1.0 and c.masks[0][:, 32:].max() == 0.0


def test_missing_folder(tmp_path):
    advice = "not found; pass a folder of 4-8 images or one of: .*koala"
    with pytest.raises(ConceptError, match=advice):
        load_concept(tmp_path / "nope")
    assert issubclass(ConceptError, ValueError)


def test_folder_without_images(tmp_path):
    folder = tmp_path / "empty"
    _save(folder, "x_mask.png", Image.new("L", (64, 64)))  # a mask alone is not an image
    with pytest.raises(ConceptError, match="no images in .*empty"):
        load_concept(folder)


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_corrupt_image_is_named(tmp_path, content):
    folder = tmp_path / "c"
    _save(folder, "good.png", Image.new("RGB", (64, 64)))
    if content == "truncated":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "broken.png")
        content = (folder / "broken.png").read_bytes()[:60]
    (folder / "broken.png").write_bytes(content)
    with pytest.raises(ConceptError, match=r"broken\.png"):
        load_concept(folder)


def test_other_modes_become_rgb(tmp_path):
    folder = tmp_path / "c"
    rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 32, 64))  # left half transparent
    _save(folder, "1_rgba.png", rgba)
    _save(folder, "2_l.png", Image.new("L", (64, 64), 128))
    _save(folder, "3_p.png", Image.new("RGB", (64, 64), (0, 255, 0)).convert("P"))
    _save(folder, "4_cmyk.jpg", Image.new("CMYK", (64, 64), (0, 0, 0, 0)))
    _save(folder, "5_rgb.webp", Image.new("RGB", (64, 64), (255, 0, 0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # right-sized images: no warning
        c = load_concept(folder)
    assert len(c) == 5 and all(im.mode == "RGB" and im.size == (64, 64) for im in c.images)
    px = [np.asarray(im) for im in c.images]
    assert px[0][0, 0].tolist() == [255, 255, 255] and px[0][0, 63].tolist() == [0, 0, 255]
    assert px[1][0, 0].tolist() == [128] * 3
    assert px[2][0, 0].tolist() == [0, 255, 0]
    assert px[3][0, 0].min() > 250  # CMYK (0, 0, 0, 0) is white
    assert px[4][0, 0, 0] > 250


def test_non_square_image_is_cropped_with_warning(tmp_path):
    folder = tmp_path / "c"
    wide = np.zeros((50, 150, 3), np.uint8)
    wide[:, :50] = (255, 0, 0)
    wide[:, 50:100] = (0, 255, 0)
    wide[:, 100:] = (0, 0, 255)
    _save(folder, "wide.png", Image.fromarray(wide))
    mask = np.zeros((50, 150), np.uint8)
    mask[:, 75:] = 255
    _save(folder, "wide_mask.png", Image.fromarray(mask))
    with pytest.warns(UserWarning, match=r"images made 64x64: wide\.png \(150x50: centre-cropped to a square and resized\)"):
        c = load_concept(folder)
    im = np.asarray(c.images[0]).astype(int)
    assert c.images[0].size == (64, 64) and c.masks[0].shape == (64, 64)
    assert (np.abs(im[:, 4:-4] - [0, 255, 0]) <= 2).all()  # only the centre third survives
    # the mask is cropped alike: its edge moves from x=75 of 150 to x=32 of 64
    assert c.masks[0][:, :28].max() < 0.05 and c.masks[0][:, 36:].min() > 0.95


def test_mask_size_mismatch_names_both_files(tmp_path):
    folder = tmp_path / "c"
    _save(folder, "a.png", Image.new("RGB", (64, 64)))
    _save(folder, "a_mask.png", Image.new("L", (32, 32)))
    with pytest.raises(ConceptError, match=r"a_mask\.png is 32x32 but image .*a\.png is 64x64"):
        load_concept(folder)


def test_own_concept_writes_its_card_and_refuses_too_few_photos(tmp_path):
    import warnings

    from PIL import Image

    from mcteach.world.concepts import ConceptError, own_concept

    folder = tmp_path / "my_dog"
    folder.mkdir()
    with pytest.raises(ConceptError, match="has 0 image"):
        own_concept(folder, "dog")
    for i in range(4):
        Image.new("RGB", (300, 200), (40 * i, 100, 150)).save(folder / f"photo{i}.jpg")
    with pytest.raises(ConceptError, match="class word"):
        own_concept(folder, " ")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 300x200 photos are cropped and resized, with a warning
        c = own_concept(folder, "dog")
    assert c.name == "my dog" and c.class_word == "dog" and len(c) == 4 and c.images[0].size == (64, 64)
    assert json.loads((folder / "concept.json").read_text())["class_word"] == "dog"
