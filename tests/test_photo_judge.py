"""The photo judge with encoders built from config (random weights, seeded): no download.

Random encoders do not recognise a concept across framings: with each concept's own renders (random background,
position and scale) as references, they pick the right concept for a held-out crop about 55-65% of the time
(chance: 50%), because colour layout, background and white padding dominate their features. So the scenes here
put every object the same way: the concept's cut-out (its mask) scaled to 28 px, centred on one grey half-image.
References are images 0-3 framed like that, scenes are made of images 4-5, held out. The emoji renders are one
glyph at other scales and places, so the held-out cut-outs then look almost like the references: these tests
check the bookkeeping (which crop is which region, rows and columns of S, the outcome rules, D&C's matching and
norm), not that an encoder recognises identities; that takes pretrained weights.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from mcteach.measure import metrics
from mcteach.measure import photo_judge as P
from mcteach.world import regions
from mcteach.world.concepts import cut_out, load_concept
from mcteach.world.regions import RegionError

BG = (128, 128, 128)
PAIRS = [("koala", "hamster"), ("peach", "croissant"), ("raccoon", "dragon")]
LR = ("left", "right")


def framed(concept, i: int, fit: int = 28) -> Image.Image:
    """Image ``i``'s cut-out scaled to ``fit`` px, centred on a grey 32x64 half-image."""
    g = cut_out(concept, i)
    s = fit / max(g.size)
    g = g.resize((max(1, round(g.width * s)), max(1, round(g.height * s))), Image.LANCZOS)
    half = Image.new("RGB", (32, 64), BG)
    half.paste(g, ((32 - g.width) // 2, (64 - g.height) // 2), g)
    return half


def scene(left, right) -> Image.Image:
    """64x64: ``left`` = (concept, image index) framed in the left half, ``right`` in the right half."""
    im = Image.new("RGB", (64, 64), BG)
    im.paste(framed(*left), (0, 0))
    im.paste(framed(*right), (32, 0))
    return im


@pytest.fixture(scope="module")
def judge():
    return P.PhotoJudge.from_config(seed=0)


@pytest.fixture(scope="module")
def concepts():
    return {name: load_concept(name) for pair in PAIRS for name in pair}


def refs_of(judge, concepts, names, encoder):
    return judge.references({n: [framed(concepts[n], i) for i in range(4)] for n in names}, encoder)


@pytest.mark.parametrize("encoder", ["dino", "clip"])
def test_correct_swapped_duplicated_on_held_out_images(judge, concepts, encoder):
    for a, b in PAIRS:
        refs = refs_of(judge, concepts, (a, b), encoder)
        A, B = concepts[a], concepts[b]
        layout = {"left": a, "right": b}
        for i, j in ((4, 5), (5, 4)):
            correct, swapped, dup = scene((A, i), (B, j)), scene((B, i), (A, j)), scene((A, i), (A, j))
            sims = judge.similarities([correct, swapped, dup], layout, refs, encoder)
            assert sims[0].regions == list(LR) and sims[0].concepts == [a, b] and sims[0].intended == [a, b]
            S = sims[0].matrix
            assert S[0, 0] > S[0, 1] and S[1, 1] > S[1, 0], f"{a}/{b} {encoder}:\n{sims[0].table()}"
            table = sims[0].table().splitlines()
            assert len(table) == 3 and f"*{S[0, 0]:.3f}" in table[1] and f"*{S[1, 1]:.3f}" in table[2]
            # the swapped scene's rows are the correct scene's rows exchanged (same crops, other halves)
            torch.testing.assert_close(sims[1].matrix, S.flip(0), atol=2e-3, rtol=0)
            results = [s.outcome() for s in sims]
            assert [r.outcome for r in results] == ["success", "swap", "duplication"]
            assert results[0].predicted == (a, b) and results[1].predicted == (b, a)
            assert max(results[0].blend) < 0.5 < min(results[1].blend)


def test_results_feed_evaluate_tables(judge, concepts):
    a, b = PAIRS[0]
    A, B = concepts[a], concepts[b]
    images = [scene((A, 4), (B, 5)), scene((B, 4), (A, 5)), scene((A, 4), (A, 5)), scene((A, 5), (B, 4))]
    results = judge.judge(images, {"left": a, "right": b}, refs_of(judge, concepts, (a, b), "dino"),
                          prompt="a koala on the left and a hamster on the right", seeds=range(4))
    assert all(isinstance(r, metrics.PairResult) for r in results)
    assert [r.seed for r in results] == [0, 1, 2, 3] and results[0].positions == LR
    summary = metrics.summarize_pairs(results)
    assert summary["n"] == 4
    assert summary["success"][0] == 0.5 and summary["swap"][0] == 0.25 and summary["duplication"][0] == 0.25
    assert "success" in metrics.summary_table({"photos": summary})


def test_max_reduce_and_outcome_with_an_empty_label():
    sim = P.RegionSimilarity(["left", "right"], ["koala", "hamster"], ["koala", "hamster"],
                             torch.tensor([[0.80, 0.20], [0.10, 0.15]]))
    assert sim.outcome().outcome == "success"
    r = sim.outcome(empty_below=0.5)  # the right region is unlike both concepts: empty
    assert r.predicted == ("koala", "nothing") and r.outcome == "neglect"
    assert sim.outcome(empty_below=0.9).outcome == "other"
    p = P.region_probs(sim.matrix, temperature=0.1, empty_below=0.5)
    assert p.shape == (2, 3)
    torch.testing.assert_close(p.sum(-1), torch.ones(2))
    torch.testing.assert_close(p[0], torch.tensor([0.8, 0.2, 0.5]).div(0.1).softmax(0))
    with pytest.raises(ValueError, match="temperature"):
        P.region_probs(sim.matrix, temperature=0)
    refs = P.References("dino", ["a", "b"], [torch.eye(3)[:2], torch.eye(3)[2:]])
    crops = torch.tensor([[1.0, 0.0, 0.0]])
    torch.testing.assert_close(refs.similarity(crops), torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(refs.similarity(crops, "max"), torch.tensor([[1.0, 0.0]]))


def test_ground_truth_matrix_is_mudis():
    e1, e2 = torch.eye(2)
    refs = P.References("dino", ["a", "b"], [torch.stack([e1, e1]), torch.stack([e1, e2])])
    # S_GT[j, k] = mean over all (reference of j, reference of k) pairs, self-pairs included
    torch.testing.assert_close(P.ground_truth_matrix(refs), torch.tensor([[1.0, 0.5], [0.5, 0.5]]))


def test_dc_from_matrices_matching_norm_and_count():
    gt = torch.tensor([[0.9, 0.3], [0.3, 0.8]])
    assert P.dc_from_matrices(gt, gt) == (pytest.approx(1.0), [0, 1])
    assert P.dc_from_matrices(gt.flip(0), gt) == (pytest.approx(1.0), [1, 0])  # detections come in any order
    swapped, _ = P.dc_from_matrices(gt.flip(0), gt, match="layout")  # regions do not
    assert swapped == pytest.approx(1 - np.sqrt(1.22))  # [[-.6, .5], [.6, -.5]] has rank 1: ||.||_2 = ||.||_F
    off = gt + torch.diag(torch.tensor([0.3, -0.4]))
    assert P.dc_from_matrices(off, gt)[0] == pytest.approx(1 - 0.4)  # spectral norm: the largest singular value
    assert P.dc_from_matrices(off, gt, ord="fro")[0] == pytest.approx(1 - 0.5)
    assert P.dc_from_matrices(torch.cat([gt, gt[:1]]), gt) == (0.0, None)  # one detection too many
    assert P.dc_from_matrices(gt[:1], gt) == (0.0, None)  # one missing
    assert P.greedy_match(torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.1, 0.2]])) == [0, 1]
    with pytest.raises(ValueError, match="match"):
        P.dc_from_matrices(gt, gt, match="hungarian")


def test_dc_score_correct_beats_swapped_and_duplicated(judge, concepts):
    for a, b in PAIRS:
        A, B = concepts[a], concepts[b]
        refs = refs_of(judge, concepts, (a, b), "dino")
        correct, swapped, dup = scene((A, 4), (B, 5)), scene((B, 4), (A, 5)), scene((A, 4), (A, 5))
        by_layout = [judge.dc_score(im, refs, layout={"left": a, "right": b}) for im in (correct, swapped, dup)]
        assert by_layout[0].score > by_layout[1].score and by_layout[0].score > by_layout[2].score
        assert by_layout[0].order == [0, 1] and by_layout[0].concepts == [a, b]
        torch.testing.assert_close(by_layout[0].ground_truth, P.ground_truth_matrix(refs))
        # boxes without concepts: matched greedily, so D&C does not see where the subjects are, only who they are
        halves = [(0, 0, 32, 64), (32, 0, 64, 64)]
        by_boxes = [judge.dc_score(im, refs, boxes=halves) for im in (correct, swapped, dup)]
        assert by_boxes[0].score == pytest.approx(by_layout[0].score)
        assert by_boxes[1].order == [1, 0] and by_boxes[1].score == pytest.approx(by_boxes[0].score, abs=2e-3)
        assert by_boxes[2].score < by_boxes[0].score


def test_dc_score_with_the_detector(judge, concepts, monkeypatch):
    A, B = concepts["koala"], concepts["hamster"]
    image = scene((A, 4), (B, 5))
    refs = refs_of(judge, concepts, ("koala", "hamster"), "dino")
    found = judge.detect(image, ["koala", "hamster"], threshold=0.0)  # random weights: boxes anywhere
    assert found and all(0 <= d.box[0] <= d.box[2] <= 64 and 0 <= d.box[1] <= d.box[3] <= 64 for d in found)
    assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    assert {d.label for d in found} <= {"koala", "hamster"}
    assert len(judge.detect(image, ["koala", "hamster"], threshold=0.0, nms_iou=None)) >= len(found)
    assert judge.detect(image, ["koala"], threshold=1.0) == []
    nothing = judge.dc_score(image, refs, threshold=1.0)
    assert nothing.score == 0.0 and nothing.order is None and nothing.boxes == []
    # with the subjects found, D&C is the same as with those boxes given; the queries are the concepts' texts
    asked = []
    boxes = [(32.0, 0.0, 64.0, 64.0), (0.0, 0.0, 32.0, 64.0)]
    monkeypatch.setattr(judge, "detect", lambda im, queries, *a: asked.append(queries) or
                        [P.Detection(b, 0.9, q) for b, q in zip(boxes, queries[::-1])])
    r = judge.dc_score(image, refs, queries={"koala": "a grey bear"})
    assert asked == [["a grey bear", "hamster"]]
    assert r.order == [1, 0] and r.score == pytest.approx(judge.dc_score(image, refs, boxes=boxes).score)


def test_nms():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float)
    scores = torch.tensor([0.8, 0.9, 0.7])
    assert P.nms(boxes, scores, 0.5) == [1, 2]
    assert P.nms(boxes, scores, 0.9) == [1, 0, 2]


def test_regions_and_crops():
    assert regions.region_box("left", 100, 50) == (0, 0, 50, 50)
    assert regions.region_box("middle-third", 90, 30) == (30, 0, 60, 30)
    assert regions.region_box("centre", 90, 30) == (0, 0, 90, 30)
    assert regions.region_box((0.25, 0, 0.75, 1), 100, 40) == (25, 0, 75, 40)
    assert regions.region_box("0,0.5,1,1", 10, 10) == (0, 5, 10, 10)
    im = Image.new("RGB", (64, 64), (255, 0, 0))
    im.paste((0, 0, 255), (32, 0, 64, 64))
    right = P.crop(im, regions.region_box("right", 64, 64))
    assert right.size == (64, 64)  # 32x64, centred on a white square
    assert right.getpixel((32, 32)) == (0, 0, 255) and right.getpixel((2, 32)) == (255, 255, 255)


def test_embed_pads_to_a_square_and_returns_unit_vectors(judge):
    wide = Image.new("RGB", (60, 20), (200, 30, 30))
    for enc in judge.encoders.values():
        e = enc.embed([wide, P.pad_square(wide)])
        torch.testing.assert_close(e[0], e[1])
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    dino = judge.encoder("dino")
    pixels = dino.processor(images=[P.pad_square(wide)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        tokens = dino.model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(dino.embed([wide]), torch.nn.functional.normalize(tokens[:, 0], dim=-1))
    mean = P.ImageEncoder("dino", dino.model, dino.processor, pool="mean")  # MuDI's DINOv2 pooling
    torch.testing.assert_close(mean.embed([wide]), torch.nn.functional.normalize(tokens.mean(1), dim=-1))
    with pytest.raises(ValueError, match="pool"):
        P.ImageEncoder("dino", dino.model, dino.processor, pool="max")


def test_load_reads_saved_models(judge, tmp_path):
    """``load`` is ``from_pretrained``: here on folders saved from the random models (the hub is unreachable)."""
    for name, enc in judge.encoders.items():
        enc.model.save_pretrained(tmp_path / name)
        enc.processor.save_pretrained(tmp_path / name)
    judge.detector.save_pretrained(tmp_path / "owl")
    judge.detector_processor.save_pretrained(tmp_path / "owl")
    loaded = P.PhotoJudge.load(clip=tmp_path / "clip", dino=tmp_path / "dino", detector=tmp_path / "owl", device="cpu")
    image = Image.new("RGB", (48, 64), (20, 140, 60))
    for name in ("clip", "dino"):
        torch.testing.assert_close(loaded.encoder(name).embed([image]), judge.encoder(name).embed([image]))
    assert [d.box for d in loaded.detect(image, ["koala"], threshold=0.0)] == \
        [d.box for d in judge.detect(image, ["koala"], threshold=0.0)]
    with pytest.raises(ValueError, match="at least one encoder"):
        P.PhotoJudge.load(clip=None, dino=None, detector=None)


def test_references_accept_concepts(judge, concepts):
    refs = judge.references({"koala": concepts["koala"]}, "clip")
    assert refs.concepts == ["koala"] and refs.embeddings[0].shape[0] == len(concepts["koala"])
    assert judge.references(refs, "clip") is refs
    with pytest.raises(ValueError, match="embedded with 'clip'"):
        judge.references(refs, "dino")


def test_bad_input_gives_clear_errors(judge, concepts):
    A = concepts["koala"]
    refs = judge.references({"koala": A.images[:4], "hamster": concepts["hamster"].images[:4]})
    image = scene((A, 4), (A, 5))
    with pytest.raises(RegionError, match="unknown region 'middle'.*left"):
        judge.similarities(image, {"middle": "koala"}, refs)
    with pytest.raises(RegionError, match="out of range or empty"):
        judge.similarities(image, {(0.5, 0, 0.5, 1): "koala"}, refs)
    with pytest.raises(ValueError, match="'hamster' has no reference images"):
        judge.references({"koala": A.images[:4], "hamster": []})
    with pytest.raises(ValueError, match="asks for 'fox', which has no references"):
        judge.similarities(image, {"left": "koala", "right": "fox"}, refs)
    with pytest.raises(TypeError, match="expected a PIL image, got ndarray"):
        judge.similarities(np.asarray(image), {"left": "koala"}, refs)
    with pytest.raises(TypeError, match="expected a PIL image, got Tensor"):
        judge.dc_score(torch.rand(3, 64, 64), refs, layout={"left": "koala"})
    with pytest.raises(TypeError, match="expected a PIL image, got str"):
        judge.references({"koala": ["koala/00.png"]})
    with pytest.raises(ValueError, match="no encoder 'dreamsim'"):
        judge.references({"koala": A.images[:4]}, "dreamsim")
    with pytest.raises(ValueError, match="each subject once"):
        judge.dc_score(image, refs, layout={"left": "koala", "right": "koala"})
    with pytest.raises(ValueError, match="no detector"):
        P.PhotoJudge(judge.encoders).dc_score(image, refs)
    with pytest.raises(ValueError, match="non-empty dict"):
        judge.similarities(image, {}, refs)
    with pytest.raises(ValueError, match="no images"):
        judge.similarities([], {"left": "koala"}, refs)
