"""The course's build-it checks (every notebook): the learner writes the core of a lesson, a check calls it on fresh
inputs and compares it with the package's own code.

    >>> from mcteach.exercises import check_guided_noise
    >>> def guided_noise(eps_uncond, eps_cond, scale):
    ...     return eps_uncond + scale * (eps_cond - eps_uncond)
    >>> check_guided_noise(guided_noise)
    ✓ guided_noise matches mcteach.sd.parts.guided_noise on 3 fresh inputs.
    True

A check returns True when the function matches, prints that it is not written yet and returns False when it raises
``NotImplementedError`` (the learner's notebook is generated with such stubs: the lesson goes on with the package's
version), and raises ``CheckFailed`` saying what differs (shape, which element, by how much) when it does not match.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler

from .measure import metrics
from .methods import engine, fusion, textual_inversion
from .methods.hypernetwork import HypernetworkLayers, HypernetworkModule
from .mixing import layout
from .mixing.masking import AttentionMasks, RegionMasker
from .mixing.passes import paste_predictions
from .paths import EMBEDDED_MODEL
from .sd import attention, parts
from .world import regions, scenes


class CheckFailed(AssertionError):
    """The learner's function does not do what the lesson's reference does; the message says how."""


class _NotWritten(Exception):
    pass


def _call(fn: Callable, *args, **kwargs):
    """``fn(*args)``: a stub's NotImplementedError becomes "not written yet", any other error a CheckFailed."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise _NotWritten from None
    except CheckFailed:
        raise
    except Exception as err:  # the learner's code broke: say where, not a torch trace from deep inside
        raise CheckFailed(f"{fn.__name__} raised {type(err).__name__}: {err}") from err


def _checked(reference: str, trials: int = 3):
    """Decorate a check body ``body(fn)`` (it raises CheckFailed on a mismatch): print the verdict, return it."""
    def wrap(body):
        @functools.wraps(body)
        def check(fn: Callable) -> bool:
            name = getattr(fn, "__name__", "your function")
            try:
                body(fn)
            except _NotWritten:
                print(f"✗ {name} is not written yet (it raises NotImplementedError): write it and run this cell "
                      f"again. The lesson goes on with {reference}.")
                return False
            print(f"✓ {name} matches {reference} on {trials} fresh inputs.")
            return True
        return check
    return wrap


def _as_tensor(got, what: str) -> torch.Tensor:
    if isinstance(got, np.ndarray):
        got = torch.from_numpy(got)
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what}: returned {type(got).__name__}, expected a torch.Tensor")
    return got


def _close(got, want: torch.Tensor, what: str, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Raise CheckFailed saying how ``got`` differs from ``want``: type, shape, or the worst element."""
    got = _as_tensor(got, what)
    if tuple(got.shape) != tuple(want.shape):
        raise CheckFailed(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    got, want = got.detach().double(), want.detach().double()
    same_inf = got.isinf() & want.isinf() & (got == want)
    bad = ~torch.isclose(got, want, atol=atol, rtol=rtol) & ~same_inf
    if bad.any():
        diff = (got - want).abs().nan_to_num(float("inf")).masked_fill(~bad, 0)
        i = tuple(int(j) for j in np.unravel_index(int(diff.argmax()), tuple(want.shape)))
        raise CheckFailed(f"{what}: {int(bad.sum())} of {want.numel()} elements differ; the worst at index {i}: "
                          f"got {got[i].item():.6g}, expected {want[i].item():.6g}")


def _equal(got, want, what: str) -> None:
    if got != want:
        raise CheckFailed(f"{what}: got {got!r}, expected {want!r}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- 00 the world


@_checked("mcteach.world.scenes.caption")
def check_caption(fn) -> None:
    """``fn(objects)``: the world's caption of [(name, position), ...], e.g. "a fox on the left and an owl on the
    right"; one object at the centre has no place words."""
    rng = np.random.default_rng(7)
    names = ["owl", "fox", "apple", "red apple", "elephant", "cat", "umbrella", "woman"]
    cases = [[("owl", "centre")], [(str(rng.choice(names)), "left"), (str(rng.choice(names)), "right")],
             [("apple", "top"), ("elephant", "bottom")]]
    for objects in cases:
        _equal(_call(fn, objects), scenes.caption(objects), f"{fn.__name__}({objects})")


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(EMBEDDED_MODEL / "tokenizer")


@_checked("mcteach.sd.attention.token_indices")
def check_find_tokens(fn) -> None:
    """``fn(tokenizer, prompt, word)``: the positions of ``word``'s tokens in the tokenized prompt."""
    tok = _tokenizer()
    for prompt, word in [("a cat on the left and a red apple on the right", "cat"),
                         ("a cat on the left and a red apple on the right", "red apple"),
                         ("an owl at the top and a fox at the bottom", "fox")]:
        want = attention.token_indices(tok, prompt, word)
        got = _call(fn, tok, prompt, word)
        hint = " (position 0 is the start-of-text token)" if list(got) == [w - 1 for w in want] else ""
        _equal(list(got), want, f"{fn.__name__}(tokenizer, {prompt!r}, {word!r}){hint}")


# ----------------------------------------------------------------------------- 01 Stable Diffusion


@_checked("mcteach.sd.parts.guided_noise")
def check_guided_noise(fn) -> None:
    """``fn(eps_uncond, eps_cond, scale)``: classifier-free guidance."""
    for seed, scale in [(0, 5.0), (1, 1.0), (2, 7.5)]:
        g = _gen(seed)
        e_u, e_c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        _close(_call(fn, e_u, e_c, scale), parts.guided_noise(e_u, e_c, scale), f"{fn.__name__}(scale={scale})")


def _ddim() -> DDIMScheduler:
    return DDIMScheduler.from_pretrained(EMBEDDED_MODEL / "scheduler")


@_checked("diffusers' DDIMScheduler.step (eta 0)")
def check_ddim_step(fn) -> None:
    """``fn(z_t, eps, alpha_bar_t, alpha_bar_prev)``: one deterministic DDIM step (predict z_0, step to t_prev)."""
    sched = _ddim()
    sched.set_timesteps(25)
    for seed, i in [(0, 0), (1, 12), (2, 24)]:
        g = _gen(seed)
        z, eps = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
        t = sched.timesteps[i]
        prev = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
        a_t = sched.alphas_cumprod[t]
        a_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        want = sched.step(eps, t, z).prev_sample
        _close(_call(fn, z, eps, a_t, a_prev), want, f"{fn.__name__} at t={int(t)}", atol=1e-4)


@_checked("mcteach.sd.attention.attention_probs")
def check_cross_attention(fn) -> None:
    """``fn(q, k)``: softmax(Q K^T / sqrt(d)) over the token axis, (B, heads, N, d) x (B, heads, T, d) -> (B, heads,
    N, T)."""
    for seed, (n, t, d) in [(0, (16, 24, 32)), (1, (64, 24, 16)), (2, (4, 7, 8))]:
        g = _gen(seed)
        q, k = torch.randn(2, 2, n, d, generator=g), torch.randn(2, 2, t, d, generator=g)
        got, want = _call(fn, q, k), attention.attention_probs(q, k)
        got = _as_tensor(got, fn.__name__)
        if got.shape == want.shape and torch.allclose(got.sum(-2), torch.ones(()), atol=1e-4):
            raise CheckFailed(f"{fn.__name__}: each token's weights sum to 1 over the pixels; the softmax must run "
                              "over the tokens (the last axis): each pixel shares its attention among the T tokens")
        _close(got, want, f"{fn.__name__}(q {tuple(q.shape)}, k {tuple(k.shape)})")


# ----------------------------------------------------------------------------- 02 Textual Inversion


@_checked("mcteach.methods.engine.loss_weights")
def check_loss_weights(fn) -> None:
    """``fn(masks, mask_weight)``: per-pixel weights 1 + mask_weight * m of the denoising loss."""
    for seed, w in [(0, 1.0), (1, 0.0), (2, 3.0)]:
        masks = (torch.rand(2, 1, 16, 16, generator=_gen(seed)) > 0.5).float()
        _close(_call(fn, masks, w), engine.loss_weights(masks, w), f"{fn.__name__}(mask_weight={w})")


@_checked("mcteach.methods.textual_inversion.restore_rows")
def check_restore_rows(fn) -> None:
    """``fn(weight, frozen, new_ids)``: after an optimizer step, every row of the embedding matrix ``weight`` except
    the new tokens' (``new_ids``) is put back to ``frozen``, in place."""
    for seed, ids in [(0, [10]), (1, [3, 4, 5, 6]), (2, [0])]:
        g = _gen(seed)
        frozen = torch.randn(12, 8, generator=g)
        stepped = frozen + 0.1 * torch.randn(12, 8, generator=g)  # what Adam did to every row
        keep = torch.ones(12, dtype=torch.bool)
        keep[ids] = False
        want = stepped.clone()
        textual_inversion.restore_rows(want, frozen, keep)
        got = stepped.clone()
        out = _call(fn, got, frozen.clone(), list(ids))
        if torch.equal(got, stepped) and isinstance(out, torch.Tensor) and out is not got:
            raise CheckFailed(f"{fn.__name__} returned a new tensor and left ``weight`` as it was: change it in place "
                              "(the embedding matrix the optimizer steps is that tensor)")
        changed = [r for r in range(12) if not torch.equal(got[r], want[r])]
        if changed:
            new = [r for r in changed if r in ids]
            raise CheckFailed(f"{fn.__name__} (new rows {ids}): rows {changed} differ from the expected result"
                              + (f"; rows {new} are the new tokens', which must keep what the step gave them"
                                 if new else "; those rows must be put back to the frozen values, in place"))


# ----------------------------------------------------------------------------- 03 HyperNetwork


@_checked("mcteach.methods.hypernetwork.HypernetworkModule")
def check_hypernetwork_context(fn) -> None:
    """``fn(c, w1, b1, w2, b2, strength)``: c + strength * (W2 relu(W1 c + b1) + b2), the residual rewrite of the
    context that K (or V) is then read from."""
    for seed, (d, s) in [(0, (16, 1.0)), (1, (8, 0.5)), (2, (32, 0.0))]:
        torch.manual_seed(seed)
        m = HypernetworkModule(d)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3)  # no zeros: every term must count
        c = torch.randn(2, 5, d, generator=_gen(seed))
        lin1, lin2 = m.linear[0], m.linear[2]
        with torch.no_grad():
            got = _call(fn, c, lin1.weight, lin1.bias, lin2.weight, lin2.bias, s)
            _close(got, m(c, s), f"{fn.__name__}(strength={s})")


@_checked("the parameters of mcteach.methods.hypernetwork.HypernetworkLayers")
def check_hypernetwork_size(fn) -> None:
    """``fn(dims, layer_structure)``: how many numbers a hypernetwork trains (weights and biases, K and V MLPs)."""
    for dims, ls in [([128], (1, 2, 1)), ([768], (1, 2, 1)), ([320, 640], (1, 4, 1))]:
        want = sum(p.numel() for p in HypernetworkLayers(dims, ls).parameters())
        _equal(_call(fn, list(dims), tuple(ls)), want, f"{fn.__name__}({list(dims)}, {list(ls)})")


# ----------------------------------------------------------------------------- 04 DreamBooth


@_checked("mcteach.methods.engine.prior_preservation_loss")
def check_prior_loss(fn) -> None:
    """``fn(pred, eps, n_instances, prior_weight)``: the concept half's mean squared error plus prior_weight times
    the class half's."""
    for seed, (b, n, w) in [(0, (4, 2, 1.0)), (1, (6, 2, 0.5)), (2, (3, 3, 1.0))]:
        g = _gen(seed)
        pred, eps = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
        pred[n:] *= 2  # the class half has a larger error: a swapped split shows
        _close(_call(fn, pred, eps, n, w), engine.prior_preservation_loss(pred, eps, n, w),
               f"{fn.__name__}(batch {b}, n_instances={n}, prior_weight={w})")


@_checked("mcteach.methods.engine.lr_at(..., 'cosine')")
def check_cosine_lr(fn) -> None:
    """``fn(step, steps, lr)``: the rate at 0-based ``step`` of ``steps``, decayed from lr to 0 on half a cosine."""
    for steps, lr in [(800, 3e-4), (10, 1.0), (400, 2e-3)]:
        got = torch.tensor([float(_call(fn, s, steps, lr)) for s in range(steps)])
        want = torch.tensor([engine.lr_at(s, steps, lr, "cosine") for s in range(steps)])
        _close(got, want, f"{fn.__name__}(step, steps={steps}, lr={lr}) over every step", atol=1e-10, rtol=1e-6)


# ----------------------------------------------------------------------------- 05 LoRA


def _peft_linear(seed: int, d_in: int, d_out: int, r: int, alpha: float):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(d_in, d_out))
    model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"]), model)
    layer = model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.2)  # peft starts B at 0: make both count
    return layer


@_checked("peft's LoRA Linear layer")
def check_lora_forward(fn) -> None:
    """``fn(x, W, b, A, B, alpha, r)``: W x + b + (alpha / r) B A x."""
    for seed, (d_in, d_out, r, alpha) in [(0, (16, 8, 4, 4.0)), (1, (32, 32, 2, 8.0)), (2, (8, 24, 8, 1.0))]:
        layer = _peft_linear(seed, d_in, d_out, r, alpha)
        x = torch.randn(3, d_in, generator=_gen(seed))
        with torch.no_grad():
            got = _call(fn, x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
                        layer.lora_B["default"].weight, alpha, r)
            _close(got, layer(x), f"{fn.__name__}(rank {r}, alpha {alpha})")


@_checked("peft's merge (layer.merge())")
def check_merge_lora(fn) -> None:
    """``fn(W, A, B, alpha, r)``: the merged weight W + (alpha / r) B A, one matrix with the adapter inside."""
    for seed, (d_in, d_out, r, alpha) in [(0, (16, 8, 4, 4.0)), (1, (32, 32, 2, 8.0)), (2, (8, 24, 8, 1.0))]:
        layer = _peft_linear(seed, d_in, d_out, r, alpha)
        w, a, b = (t.detach().clone() for t in (layer.base_layer.weight, layer.lora_A["default"].weight,
                                                 layer.lora_B["default"].weight))
        layer.merge()
        _close(_call(fn, w, a, b, alpha, r), layer.base_layer.weight, f"{fn.__name__}(rank {r}, alpha {alpha})")


# ----------------------------------------------------------------------------- 06 the mixing problem

_OUTCOME_CASES = [
    (("woman", "man"), (0.9, 0.8), ("woman", "man")),
    (("man", "woman"), (0.9, 0.8), ("woman", "man")),
    (("woman", "woman"), (0.9, 0.8), ("woman", "man")),
    (("woman", "koala"), (0.9, 0.8), ("woman", "man")),
    (("woman", "man"), (0.9, 0.3), ("woman", "man")),
    (("fox", "owl"), (0.9, 0.9), ("woman", "man")),
    (("man", "man"), (0.7, 0.6), ("woman", "man")),
]


@_checked("mcteach.measure.metrics.outcome_of", trials=len(_OUTCOME_CASES))
def check_outcome(fn) -> None:
    """``fn(pred, conf, intended, tau)``: success / swap / duplication / neglect / other for one image."""
    for pred, conf, intended in _OUTCOME_CASES:
        _equal(_call(fn, pred, conf, intended, 0.5), metrics.outcome_of(pred, conf, intended, 0.5),
               f"{fn.__name__}(pred={pred}, conf={conf}, intended={intended})")


@_checked("the blend index of mcteach.measure.metrics.instance_outcome")
def check_blend_index(fn) -> None:
    """``fn(p_intended, p_other)``: MI = p(other) / (p(intended) + p(other)) in one region."""
    labels = ["woman", "man", "fox"]
    for seed in range(3):
        p = torch.rand(2, 3, generator=_gen(seed)).softmax(-1)
        want = metrics.instance_outcome(labels, [p[0], p[1]], ["woman", "man"])[3]
        got = (_call(fn, float(p[0, 0]), float(p[0, 1])), _call(fn, float(p[1, 1]), float(p[1, 0])))
        _close(torch.tensor([float(x) for x in got]), torch.tensor(want), f"{fn.__name__} on regions {p.tolist()}")


# ----------------------------------------------------------------------------- 07 attention masking


@_checked("mcteach.world.regions.masks_at")
def check_mask_at(fn) -> None:
    """``fn(mask, side)``: a region mask (H, W) at a UNet resolution, flattened (side * side,) bool: a cell belongs
    to the region when at least half of it does (area average >= 0.5)."""
    for spec, side in [("left", 16), ((0.1, 0.2, 0.63, 0.9), 8), ((0.3, 0.0, 1.0, 0.55), 4)]:
        mask = regions.region_masks([spec], 64)[0].float()
        want = regions.masks_at(mask[None], side)[0]
        got = _as_tensor(_call(fn, mask, side), fn.__name__)
        if got.shape == (side, side):
            got = got.flatten()
        _close(got.bool().float(), want.float(), f"{fn.__name__}(region {spec!r}, side {side})")


@_checked("the token masks of mcteach.mixing.masking.RegionMasker")
def check_token_bias(fn) -> None:
    """``fn(masks, spans, n_keys)``: the cross-attention logit bias (N, n_keys): -inf where a region's token would be
    read from a pixel outside its region, 0 everywhere else (other tokens are read everywhere)."""
    for seed, (side, n_keys, spans) in [(0, (4, 12, [[2], [6, 7]])), (1, (8, 24, [[1, 2], [9]])), (2, (2, 6, [[3]]))]:
        masks = torch.rand(len(spans), side * side, generator=_gen(seed)) > 0.5
        masker = RegionMasker(torch.zeros(len(spans), 1, 1), AttentionMasks(cross="tokens", self_attention=False),
                              spans=spans, guidance=False)
        masker._hard[side] = masks  # the masks at this resolution, as the processor would ask for them
        want = masker.bias("layer", side * side, n_keys, 1, True, torch.zeros(1))[0, 0]
        got = _as_tensor(_call(fn, masks, spans, n_keys), fn.__name__).float()
        finite = got[torch.isfinite(got)]
        if got.shape == want.shape and finite.numel() and not torch.all(finite == 0):
            raise CheckFailed(f"{fn.__name__}: a logit bias holds 0 (allowed) and -inf (forbidden) only; found "
                              f"{sorted(set(finite.unique().tolist()))[:4]}")
        _close(got, want, f"{fn.__name__}(side {side}, spans {spans})")


@_checked("the regional prompts of mcteach.mixing.masking.RegionMasker", trials=4)
def check_regional_bias(fn) -> None:
    """``fn(masks, chunk, on)``: the cross-attention logit bias (N, (R + 1) chunk) of regional prompts, the context
    [global | sub_1 | ... | sub_R]: where masks act (``on``), a pixel of region r reads only sub_r and a pixel of no
    region only the global prompt; where they are off, every pixel reads the global prompt alone."""
    for seed, (side, chunk, n_regions, on) in [(0, (4, 5, 2, True)), (1, (4, 3, 2, False)), (2, (8, 4, 3, True)),
                                               (3, (2, 6, 1, False))]:
        pick = torch.randint(0, n_regions + 1, (side * side,), generator=_gen(seed))  # n_regions: the background
        masks = torch.stack([pick == r for r in range(n_regions)])
        fix = AttentionMasks(cross="regional", self_attention=False, bind_adapters=False, resolutions=None if on else (0,))
        masker = RegionMasker(torch.zeros(n_regions, 1, 1), fix, chunk=chunk)
        masker._hard[side] = masks
        want = masker.bias("layer", side * side, (n_regions + 1) * chunk, 2, True, torch.zeros(1))[0, 0]
        want = want.expand(side * side, -1)
        got = _as_tensor(_call(fn, masks, chunk, on), fn.__name__).float()
        _close(got, want, f"{fn.__name__}({n_regions} regions, chunk {chunk}, masks {'on' if on else 'off'})")


@_checked("mcteach.mixing.layout.layout_score")
def check_layout_score(fn) -> None:
    """``fn(maps, places)``: one candidate layout's score, for maps (R, s, s) (each concept's attention, any scale)
    and places (R, s, s) bool (the place it gives each concept): the mean over concepts of the share of the
    concept's attention inside its place, one number in [0, 1]."""
    for seed, (n, side) in [(0, (2, 8)), (1, (3, 6)), (2, (2, 4))]:
        g = _gen(seed)
        maps = torch.rand(n, side, side, generator=g) ** 3 * torch.logspace(0, 2, n)[:, None, None]  # unlike scales
        pick = torch.randint(0, n, (side, side), generator=g)
        places = torch.stack([pick == k for k in range(n)])
        want = float(layout.layout_score(maps, places))
        got = _call(fn, maps, places)
        got = got.item() if isinstance(got, torch.Tensor) and got.numel() == 1 else got
        if not isinstance(got, (float, int)):
            raise CheckFailed(f"{fn.__name__}: returned {type(got).__name__}, expected one number")
        if abs(float(got) - want) > 1e-5:
            raise CheckFailed(f"{fn.__name__}({n} concepts at {side}x{side}): got {float(got):.4f}, expected "
                              f"{want:.4f} (each concept's share of its own attention inside its place, then the mean)")


@_checked("mcteach.methods.fusion.fit_update")
def check_fit_update(fn) -> None:
    """``fn(deltas, grams, ridge)``: the one update D (d_out, d_in) closest to each LoRA's update D_i on its own
    concept's inputs: (sum_i D_i G_i)(sum_i G_i + ridge * mean(diag(sum_i G_i)) I)^-1."""
    for seed, (n, d_out, d_in, ridge) in [(0, (2, 5, 6, 1e-4)), (1, (3, 4, 8, 1e-2)), (2, (2, 7, 3, 0.1))]:
        g = _gen(seed)
        deltas = [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in range(n)]
        xs = [torch.randn(20, d_in, generator=g, dtype=torch.float64) * torch.rand(d_in, generator=g, dtype=torch.float64)
              for _ in range(n)]  # each concept's inputs stretched along its own directions
        grams = [x.T @ x / len(x) for x in xs]
        _close(_call(fn, deltas, grams, ridge), fusion.fit_update(deltas, grams, ridge),
               f"{fn.__name__}({n} LoRAs, {d_out}x{d_in}, ridge {ridge})", atol=1e-6)


@_checked("mcteach.mixing.passes.paste_predictions")
def check_paste(fn) -> None:
    """``fn(eps_regions, weights, eps_rest, rest)``: sum_r w_r eps_r + rest * eps_rest."""
    for seed, n in [(0, 2), (1, 3), (2, 1)]:
        g = _gen(seed)
        w = torch.rand(n, 1, 8, 8, generator=g)
        w = w / w.sum(0, keepdim=True).clamp_min(1.0) * (torch.rand(1, 8, 8, generator=g) > 0.3)
        rest = (1 - w.sum(0)).clamp_min(0)
        eps = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(n)]
        e_rest = torch.randn(2, 4, 8, 8, generator=g)
        _close(_call(fn, eps, w, e_rest, rest), paste_predictions(eps, w, e_rest, rest), f"{fn.__name__}({n} regions)")


# ----------------------------------------------------------------------------- 08 comparison


@_checked("mcteach.measure.metrics.bootstrap_ci (to within 0.07: another random stream)")
def check_bootstrap(fn) -> None:
    """``fn(values, n, seed)``: (mean, low, high), the 95% bootstrap interval of the mean of ``values`` from ``n``
    resamples with replacement."""
    for seed, p in [(0, 0.5), (1, 0.2), (2, 0.9)]:
        values = (np.random.default_rng(seed + 10).random(32) < p).astype(float)
        want = metrics.bootstrap_ci(values, 2000, seed)
        got = _call(fn, values, 2000, seed)
        if not (isinstance(got, tuple | list) and len(got) == 3):
            raise CheckFailed(f"{fn.__name__}: returned {got!r}, expected a tuple (mean, low, high)")
        mean, lo, hi = (float(x) for x in got)
        if hi - lo < 1e-9 and want[2] - want[1] > 0.05:
            raise CheckFailed(f"{fn.__name__}: the interval [{lo:.3f}, {hi:.3f}] has no width: each resample must "
                              f"draw {len(values)} values *with* replacement")
        for what, g_, w_, tol in [("mean", mean, want[0], 1e-9), ("low", lo, want[1], 0.07),
                                  ("high", hi, want[2], 0.07)]:
            if not math.isfinite(g_) or abs(g_ - w_) > tol:
                raise CheckFailed(f"{fn.__name__} on {int(values.sum())} of {len(values)} successes: {what} {g_:.3f}, "
                                  f"expected {w_:.3f} (within {tol})")


@_checked("the rates of mcteach.measure.metrics.summarize_pairs")
def check_outcome_rates(fn) -> None:
    """``fn(outcomes)``: the fraction of images with each outcome, a dict over ``metrics.OUTCOMES`` (they sum
    to 1)."""
    rng = np.random.default_rng(3)
    for n in (16, 5, 40):
        outcomes = [str(o) for o in rng.choice(metrics.OUTCOMES, size=n, p=[0.4, 0.3, 0.1, 0.1, 0.1])]
        results = [metrics.PairResult("", ("a", "b"), ("left", "right"), i, ("a", "b"), (1.0, 1.0), (0.0, 0.0), o)
                   for i, o in enumerate(outcomes)]
        summary = metrics.summarize_pairs(results)
        got = _call(fn, outcomes)
        if not isinstance(got, dict):
            raise CheckFailed(f"{fn.__name__}: returned {type(got).__name__}, expected a dict outcome -> fraction")
        for o in metrics.OUTCOMES:
            g_ = float(got.get(o, 0.0))
            if abs(g_ - summary[o][0]) > 1e-9:
                raise CheckFailed(f"{fn.__name__} on {n} images: {o} {g_:.4g}, expected {summary[o][0]:.4g} (a "
                                  "fraction of the images, not a count)")


#: each notebook's checks, in the order its build-it cells call them (a test keeps them in step)
# ----------------------------------------------------------------------------- 09 kinds of concepts


@_checked("the background of mcteach.world.regions.region_masks")
def check_background_mask(fn) -> None:
    """``fn(local)``: the background's mask (H, W) from the local regions' masks (R, H, W): every pixel no local
    region covers, 1 - max_r m_r."""
    for specs in (["0.05,0.1,0.45,0.9", "0.55,0.2,0.95,1"], ["0.05,0.3,0.45,1", "0.1,0.3,0.4,0.5", "0.55,0.3,0.95,1"],
                  ["0.2,0.1,0.7,0.6"]):
        within = [None, 0, None] if len(specs) == 3 else None
        local = regions.region_masks(specs, 64, within=within)
        want = regions.region_masks(specs + [regions.BACKGROUND], 64, within=(within or [None] * len(specs)) + [None])[-1]
        _close(_as_tensor(_call(fn, local.clone()), fn.__name__).float(), want, f"{fn.__name__}({len(specs)} regions {specs})")


@_checked("mcteach.world.regions.exclusive_masks")
def check_exclusive_masks(fn) -> None:
    """``fn(masks, within)``: each pixel's owner: every nested region's pixels (``within[i] = j``: region i inside
    region j) taken out of its parent's mask, the others unchanged."""
    cases = [(["0.05,0.3,0.45,1", "0.1,0.3,0.4,0.5", "0.55,0.3,0.95,1"], [None, 0, None]),
             (["0.55,0.2,0.95,1", "left", "0.6,0.2,0.9,0.45", "0.1,0.6,0.3,0.9"], [None, None, 0, 1]),
             (["left", "right"], [None, None])]
    for specs, within in cases:
        masks = regions.region_masks(specs, 64, within=within)
        want = regions.exclusive_masks(masks, within)
        _close(_as_tensor(_call(fn, masks.clone(), list(within)), fn.__name__).float(), want,
               f"{fn.__name__}({specs}, within={within})")


CHECKS = {
    "00": (check_caption, check_find_tokens),
    "01": (check_guided_noise, check_ddim_step, check_cross_attention),
    "02": (check_loss_weights, check_restore_rows),
    "03": (check_hypernetwork_context, check_hypernetwork_size),
    "04": (check_prior_loss, check_cosine_lr),
    "05": (check_lora_forward, check_merge_lora),
    "06": (check_outcome, check_blend_index),
    "07": (check_mask_at, check_token_bias, check_paste, check_regional_bias, check_fit_update, check_layout_score),
    "08": (check_bootstrap, check_outcome_rates),
    "09": (check_background_mask, check_exclusive_masks),
}
