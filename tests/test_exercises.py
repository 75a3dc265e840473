"""The build-it exercises: every check passes on the notebook's own solution, reports the learner's stub as not
written, and fails, saying what differs, on a typical mistake."""

import ast
import math

import nbformat
import numpy as np
import pytest
import torch

from mcteach import course, exercises
from mcteach.exercises import CHECKS, CheckFailed
from mcteach.paths import NOTEBOOKS

SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def build_it_cells(path):
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"
            and course.BEGIN in c.source]


def run_cell(source: str) -> dict[str, bool]:
    """Define the cell's imports and functions, then run its ``check_*(fn)`` calls: {check name: verdict}. (The
    cell's other lines use the notebook's pipeline; the checks need nothing but the functions.)"""
    tree = ast.parse(source)
    ns = {"torch": torch, "np": np, "math": math}
    defs = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom | ast.FunctionDef)]
    exec(compile(ast.Module(defs, []), "<build-it>", "exec"), ns)
    verdicts = {}
    for node in tree.body:
        call = node.value if isinstance(node, ast.Expr) else None
        if isinstance(call, ast.Call) and getattr(call.func, "id", "").startswith("check_"):
            verdicts[call.func.id] = ns[call.func.id](ns[call.args[0].id])
    return verdicts


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name[:2])
def test_every_notebook_has_build_its_whose_solutions_pass_and_stubs_do_not(path, capsys):
    cells = build_it_cells(path)
    blocks = sum(c.count(course.BEGIN) for c in cells)
    assert blocks >= 2, f"{path.name}: {blocks} build-it solutions, the course asks for at least 2"
    solved = {k: v for c in cells for k, v in run_cell(c).items()}
    assert list(solved) == [c.__name__ for c in CHECKS[path.name[:2]]], "the checks, in the notebook's order"
    assert all(solved.values()), solved
    stubbed = {k: v for c in cells for k, v in run_cell(course.strip_solutions(c)).items()}
    assert stubbed == {k: False for k in solved}, stubbed
    out = capsys.readouterr().out
    assert out.count("✓") == len(solved) and out.count("is not written yet") == len(solved)


def test_the_learners_version_is_the_source_with_its_solutions_stubbed_and_up_to_date():
    for path in SOURCES:
        source = nbformat.read(path, as_version=4)
        learner = nbformat.read(course.LEARNER / path.name, as_version=4)
        want = course.learner_version(source)
        assert [c.source for c in learner.cells] == [c.source for c in want.cells], \
            f"{path.name}: run `mcteach course --sync` to rewrite notebooks/learner/"
        assert [c.get("outputs") for c in learner.cells] == [c.get("outputs") for c in want.cells]
        assert not any(course.BEGIN in c.source for c in learner.cells)
        assert sum(course.STUB in c.source for c in learner.cells) == len(build_it_cells(path))


def test_strip_solutions_keeps_the_indentation_and_refuses_unclosed_blocks():
    src = "def f(x):\n    '''doc'''\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION\n\ncheck(f)"
    assert course.strip_solutions(src) == f"def f(x):\n    '''doc'''\n    {course.STUB}\n\ncheck(f)"
    with pytest.raises(ValueError, match="without its ### END SOLUTION"):
        course.strip_solutions("### BEGIN SOLUTION\nx = 1")
    with pytest.raises(ValueError, match="without its ### BEGIN SOLUTION"):
        course.strip_solutions("x = 1\n### END SOLUTION")


# ----------------------------------------------------------------------------- typical mistakes


def caption_always_a(objects):
    from mcteach.world.regions import POSITIONS
    return " and ".join(f"a {n}" + (f" {POSITIONS[p]}" if len(objects) > 1 or p != "centre" else "")
                        for n, p in objects)


def find_tokens_without_start(tokenizer, prompt, word):
    ids = tokenizer(prompt, add_special_tokens=False).input_ids  # forgets start-of-text: every position one too low
    target = tokenizer(word, add_special_tokens=False).input_ids
    starts = [i for i in range(len(ids) - len(target) + 1) if ids[i:i + len(target)] == target]
    return [i + j for i in starts for j in range(len(target))]


def softmax_over_pixels(q, k):
    return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-2)


def ddim_without_roots(z, eps, a_t, a_prev):
    z0 = (z - (1 - a_t) * eps) / a_t
    return a_prev * z0 + (1 - a_prev) * eps


def restore_the_new_rows(weight, frozen, new_ids):
    weight[new_ids] = frozen[new_ids]


def restore_into_a_copy(weight, frozen, new_ids):
    out = frozen.clone()
    out[new_ids] = weight[new_ids]
    return out


def prior_loss_whole_batch(pred, eps, n, w):
    return (pred - eps).pow(2).mean() * (1 + w) / 2


MISTAKES = [
    ("check_caption", caption_always_a, "expected 'an owl'"),
    ("check_find_tokens", find_tokens_without_start, "position 0 is the start-of-text token"),
    ("check_guided_noise", lambda e_u, e_c, w: e_c + w * (e_c - e_u), "elements differ"),
    ("check_ddim_step", ddim_without_roots, "elements differ"),
    ("check_cross_attention", softmax_over_pixels, "must run over the tokens"),
    ("check_cross_attention", lambda q, k: (q @ k.transpose(-1, -2)).softmax(-1), "elements differ"),  # no 1/sqrt(d)
    ("check_loss_weights", lambda m, w: w * m, "elements differ"),
    ("check_restore_rows", restore_the_new_rows, "are the new tokens'"),
    ("check_restore_rows", restore_into_a_copy, "in place"),
    ("check_hypernetwork_context", lambda c, w1, b1, w2, b2, s: s * (torch.relu(c @ w1.T + b1) @ w2.T + b2),
     "elements differ"),  # no residual
    ("check_hypernetwork_size", lambda dims, ls: sum(2 * d * d + 2 * d + 2 * d * d + d for d in dims), "expected"),
    ("check_prior_loss", prior_loss_whole_batch, "elements differ"),
    ("check_cosine_lr", lambda i, n, lr: lr * 0.5 * (1 + math.cos(2 * math.pi * i / n)), "over every step"),
    ("check_lora_forward", lambda x, W, b, A, B, alpha, r: x @ W.T + b + alpha * (x @ A.T @ B.T), "elements differ"),
    ("check_merge_lora", lambda W, A, B, alpha, r: W + alpha * B @ A, "elements differ"),  # alpha, not alpha / r
    ("check_merge_lora", lambda W, A, B, alpha, r: W + (alpha / r) * A.T @ B.T, "raised RuntimeError: The size"),
    ("check_outcome", lambda pred, conf, intended, tau=0.5: "success" if set(pred) == set(intended) else "other",
     "expected 'swap'"),
    ("check_blend_index", lambda p_i, p_o: p_o, "elements differ"),
    ("check_mask_at", lambda mask, side: torch.nn.functional.interpolate(mask[None, None], size=(side, side),
                                                                          mode="nearest").flatten() > 0.5,
     "elements differ"),
    ("check_mask_at", lambda mask, side: torch.nn.functional.interpolate(mask[None, None], size=(8, 8),
                                                                          mode="area").flatten() >= 0.5, "shape"),
    ("check_token_bias", lambda masks, spans, n: torch.zeros(masks.shape[1], n), "elements differ"),  # no mask
    ("check_token_bias", lambda masks, spans, n: torch.ones(masks.shape[1], n), r"0 \(allowed\) and -inf"),
    ("check_paste", lambda eps, w, e_rest, rest: sum(wi * e for wi, e in zip(w, eps)), "elements differ"),
    ("check_bootstrap", lambda v, n, seed: (float(np.mean(v)),) * 3, "has no width"),
    ("check_outcome_rates", lambda outcomes: {o: outcomes.count(o) for o in ("success", "swap")},
     "a fraction of the images"),
]


def inverted_token_bias(masks, spans, n_keys):
    bias = torch.zeros(masks.shape[1], n_keys)
    for region, span in enumerate(spans):
        for token in span:
            bias[masks[region], token] = float("-inf")  # forbids the region itself
    return bias


MISTAKES.append(("check_token_bias", inverted_token_bias, "elements differ"))


def regional_bias(masks, chunk, on, masks_off_open=False):
    """The solution, or with ``masks_off_open`` the mistake the course's own code once made: masks off, no bias."""
    n_regions, n = masks.shape
    if not on:
        return torch.zeros(n, (n_regions + 1) * chunk) if masks_off_open else \
            torch.cat([torch.zeros(n, chunk), torch.full((n, n_regions * chunk), float("-inf"))], 1)
    bias = torch.full((n, (n_regions + 1) * chunk), float("-inf"))
    bias[~masks.any(0), :chunk] = 0
    for r in range(n_regions):
        bias[masks[r], (r + 1) * chunk : (r + 2) * chunk] = 0
    return bias


MISTAKES += [
    ("check_regional_bias", lambda m, chunk, on: regional_bias(m, chunk, on, masks_off_open=True), "masks off"),
    ("check_regional_bias", lambda m, chunk, on: regional_bias(m, chunk, True), "masks off"),  # always on
]


def layout_score(maps, places, normalise=True, mean=True):
    """The solution, or two typical mistakes: raw attention mass (the loud concept outweighs the quiet one), or the
    sum over concepts instead of the mean."""
    share = maps.flatten(1) / (maps.flatten(1).sum(1, keepdim=True) if normalise else maps.sum())
    inside = (share * places.flatten(1)).sum(1)
    return float(inside.mean() if mean else inside.sum())


MISTAKES += [
    ("check_layout_score", lambda m, p: layout_score(m, p, normalise=False), "expected"),
    ("check_layout_score", lambda m, p: layout_score(m, p, mean=False), "expected"),
    ("check_layout_score", lambda m, p: torch.tensor([0.5, 0.5]), "expected one number"),
]


def fit_update(deltas, grams, ridge, how="solve"):
    """The solution, or two typical mistakes: the plain sum of the updates (what loading both LoRAs does), or the
    ridge added without its scale."""
    total = sum(grams)
    scale = total.diagonal().mean() if how != "unscaled" else 1.0
    if how == "sum":
        return sum(deltas)
    lhs = total + ridge * scale * torch.eye(total.shape[0], dtype=total.dtype)
    return sum(d @ g for d, g in zip(deltas, grams)) @ torch.linalg.inv(lhs)


MISTAKES += [
    ("check_fit_update", lambda d, g, r: fit_update(d, g, r, "sum"), "elements differ"),
    ("check_fit_update", lambda d, g, r: fit_update(d, g, r, "unscaled"), "elements differ"),
]


def test_the_fit_update_solution_passes():
    assert exercises.check_fit_update(fit_update)


def test_the_layout_score_solution_passes():
    assert exercises.check_layout_score(layout_score)


def test_the_regional_bias_solution_passes():
    assert exercises.check_regional_bias(regional_bias)


def background_sum(local):
    """A typical mistake: 1 - the sum of the local masks (a wearer and her hat overlap: the sum counts her twice,
    and the hat's pixels get a weight of -1)."""
    return 1 - local.sum(0)


def exclusive_backwards(masks, within):
    """A typical mistake: the parent's pixels taken out of the nested region (the hat loses itself to its wearer)."""
    out = masks.clone()
    for i, j in enumerate(within):
        if j is not None:
            out[i] = (out[i] - masks[j]).clamp_min(0)
    return out


MISTAKES += [
    ("check_background_mask", background_sum, "elements differ"),
    ("check_background_mask", lambda local: 1 - local[0], "elements differ"),
    ("check_exclusive_masks", exclusive_backwards, "elements differ"),
    ("check_exclusive_masks", lambda masks, within: masks, "elements differ"),
]


@pytest.mark.parametrize("check, fn, message", MISTAKES, ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES)])
def test_a_typical_mistake_fails_with_a_message_that_says_what_differs(check, fn, message):
    with pytest.raises(CheckFailed, match=message):
        getattr(exercises, check)(fn)


def test_a_function_that_breaks_is_reported_as_the_learners_error_not_a_deep_trace():
    def guided_noise(e_u, e_c, w):
        return e_u.view(3, -1) + w * e_c  # 512 values do not split into 3 rows

    with pytest.raises(CheckFailed, match=r"^guided_noise raised RuntimeError: shape '\[3, -1\]' is invalid"):
        exercises.check_guided_noise(guided_noise)


def test_every_check_is_called_by_a_notebook():
    called = {name for path in SOURCES for c in build_it_cells(path) for name in run_cell_names(c)}
    assert called == {c.__name__ for checks in CHECKS.values() for c in checks}


def run_cell_names(source: str) -> list[str]:
    return [n.value.func.id for n in ast.parse(source).body if isinstance(n, ast.Expr)
            and isinstance(n.value, ast.Call) and getattr(n.value.func, "id", "").startswith("check_")]


@pytest.mark.parametrize("name", ["01_stable_diffusion_basics", "08_comparison"])
def test_the_learners_copy_runs_top_to_bottom_with_every_stub_reported(name):
    """A learner who skips the build-its still reaches the end: the checks report the stubs, later cells use the
    package's versions, and relative paths work from notebooks/learner/."""
    from nbclient import NotebookClient

    path = course.LEARNER / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert printed.count("is not written yet") == len(CHECKS[name[:2]]) and "✓" not in printed

