"""Build the shipped instruction set ``localnorm_instruct/{train,valid}.jsonl`` (``completions``).

Questions about this package's norms, placements, optimizers, RL losses and quantization,
answered from the package's math (docs/*.md, the modules' docstrings), plus worked numeric
examples whose answers are computed here. Deterministic: the same files on every run.

Prompts read ``Q: ...\\nA:`` so they also work without a chat template (the demo model's
tokenizer has none): the completion is encoded right after the prompt.

Run: ``python -m mlx_localnorm.data.build_instruct [OUT_DIR]``.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Iterator
from pathlib import Path

from ._io import atomic_write_bytes
from .sft import INSTRUCT_DIR

VALID_EVERY = 10  # every 10th record (after a seeded shuffle) is held out

# name in ln.NORMS -> (title, class, formula, arXiv id, parameters)
NORMS = {
    "rmsnorm": ("RMSNorm", "RMSNorm", "y = gamma * x / RMS(x), with RMS(x) = sqrt(mean(x^2) + eps)",
                "1910.07467", "a gain gamma of shape [D], initialized to 1"),
    "layernorm": ("LayerNorm", "LayerNorm",
                  "y = gamma * (x - mean(x)) / sqrt(var(x) + eps) + beta", "1607.06450",
                  "a gain gamma and a bias beta of shape [D] (both optional)"),
    "seednorm": ("SeeDNorm", "SeeDNorm",
                 "s = tanh(<x, beta>) per row from the raw x, then "
                 "y = (gamma + alpha * s) * x / RMS(x)", "2510.22777",
                 "gamma, alpha and beta, each of shape [D], initialized to 1, 1 and 0 so it "
                 "equals RMSNorm at initialization"),
    "dyt": ("DyT (dynamic tanh)", "DyT", "y = gamma * tanh(alpha * x) + beta", "2503.10622",
            "one scalar alpha per layer (default init 0.5), gamma initialized to 1 and beta to 0"),
    "l2norm": ("L2Norm", "L2Norm", "y = x / max(||x||, eps), computed in float32", "2410.01131",
               "no parameters by default (an optional learnable scale vector)"),
    "patchnorm": ("PatchNorm", "PatchNorm",
                  "z_p = (W * x)_p / d_p + b, with d_p = sqrt(mean(P_p(x)^2) + eps) over the "
                  "patch P_p that output p sees (mode 'rms')", "2512.22247",
                  "its own linear map W (a diagonal gain or a full D x D matrix initialized to "
                  "the identity) and a bias b"),
    "angpt": ("ApproxNorm (anGPT)", "ApproxNorm",
              "y = nu * x, with nu a constant chosen so the expected norm is 1", "2505.22014",
              "no parameters: the constant nu"),
}

PLACEMENTS = {
    "post": ("Post-LN", "x = N(x + F(x)), with no final norm", "1706.03762"),
    "pre": ("Pre-LN", "x = x + F(N(x)), with a final norm before the head", "2002.04745"),
    "mix": ("Mix-LN", "Post-LN in blocks l < floor(a * L) and Pre-LN after, a = 0.25 by "
            "default, with a final norm", "2412.13795"),
    "peri": ("Peri-LN", "x0 = N(embed), then x = x + N_out(F(N_in(x))), with a final norm; "
             "the residual stream itself is never normalized", "2502.02732"),
    "sandwich": ("Sandwich-LN", "x = x + N_out(F(N_in(x))), Peri-LN without the embedding "
                 "norm", "2105.13290"),
    "lnscaling": ("LayerNorm scaling", "Pre-LN with N(x) / sqrt(l) for both sub-layers of "
                  "block l (1-based)", "2502.05795"),
    "ngpt": ("nGPT", "no norm layers; the hidden state stays on the unit sphere, "
             "h = L2(h + |alpha_A| * (L2(Attn(h)) - h)) and the same with alpha_M and the MLP",
             "2410.01131"),
    "angpt": ("anGPT", "nGPT's structure with the exact hidden-state normalizations replaced "
              "by ApproxNorm constants; QK-norm stays exact and weights are constrained to "
              "w / max(1, ||w||)", "2505.22014"),
}

FACTS = [
    ("What does Muon do to the momentum before applying it?",
     "It orthogonalizes it: O = orth(U) by Newton-Schulz iterations, then scales O by "
     "sqrt(max(1, m/n)) (the default 'spectral' scale) and applies "
     "W = W * (1 - lr * wd) - lr * O."),
    ("What are Muon's default hyperparameters in mlx_localnorm?",
     "Learning rate 0.02, momentum 0.95, Nesterov momentum, and 5 Newton-Schulz steps."),
    ("Which Newton-Schulz coefficients does Muon use?",
     "(a, b, c) = (3.4445, -4.7750, 2.0315) in X = a X + (b A + c A A) X with A = X X^T, "
     "after X = U / (||U||_F + 1e-7)."),
    ("Where do the singular values end up after Muon's Newton-Schulz iteration?",
     "Roughly in [0.7, 1.2]: the quintic iteration trades exactness for speed."),
    ("What is Polar Express?",
     "An orthogonalization for Muon (arXiv 2505.16932): the same iteration as Newton-Schulz "
     "but with different coefficients at each of its 5 steps, so the singular values land "
     "closer to 1."),
    ("What is cautious weight decay?",
     "Decay applied only where the update and the weight agree in sign, O * W >= 0, with O "
     "the scaled orthogonalized update (arXiv 2510.12402)."),
    ("What does NorMuon add to Muon?",
     "A per-neuron second moment after orthogonalization: v = b2 * v + (1 - b2) * "
     "mean_cols(O^2), O = O / (sqrt(v) + eps), rescaled so ||O||_F is unchanged; "
     "b2 = 0.95 (arXiv 2510.05491)."),
    ("What is Scion's update?",
     "Momentum d = (1 - a) d + a g, then W = (1 - lr) W + lr * lmo(d) (constrained) or "
     "W = W + lr * lmo(d), with a linear minimization oracle per layer type (arXiv "
     "2502.07529)."),
    ("Which LMO does Scion use for hidden matrices?",
     "lmo(d) = -rho * sqrt(m/n) * orth(d), the spectral-norm oracle."),
    ("Which LMO does Scion use for the embedding?",
     "The column-norm oracle: each column becomes -rho * sqrt(m) * d_j / ||d_j||."),
    ("Which LMO does Scion use for the output head?",
     "The sign oracle: -(rho / n) * sign(d)."),
    ("What is the LARS trust ratio?",
     "eta * ||w|| / (||g|| + wd * ||w||), per layer (arXiv 1708.03888)."),
    ("How does LAMB scale its step?",
     "With the Adam direction r and u = r + wd * w, the step is lr * (||w|| / ||u||) * u, "
     "the ratio taken as 1 when a norm is 0 (arXiv 1904.00962)."),
    ("Which parameters go to Muon and which to AdamW?",
     "Hidden 2-D (or stacked 3-D) matrices go to the Muon family; embeddings, the head, "
     "gains, biases and scalars go to AdamW."),
    ("Which SeeDNorm parameters get weight decay?",
     "alpha and beta (they go to the AdamW group with decay); gamma goes without decay."),
    ("Why does SeeDNorm compute its dot product from the raw input?",
     "So the output keeps information about the input norm, while the 1/RMS(x) factor keeps "
     "RMSNorm's norm-adaptive gradient."),
    ("What is the affine divergence?",
     "For z = W x + b and one SGD step on one sample, the activation moves by "
     "dz = -lr * g * (||x||^2 + 1): a sample-dependent step (arXiv 2512.22247)."),
    ("What does an affine-divergence layer compute?",
     "z = (W x + b) / sqrt(||x||^2 + 1), so one SGD step moves the activation by exactly "
     "-lr * g."),
    ("Why can PatchNorm not be written as a norm followed by a layer?",
     "Each output position is divided by a norm of exactly the patch its kernel saw, so the "
     "division is inseparable from the linear map: PatchNorm owns its weights."),
    ("What does QK-norm do?",
     "It normalizes queries and keys per head over head_dim with an RMSNorm (gain of size "
     "head_dim) before RoPE, then applies the usual 1/sqrt(head_dim) scale."),
    ("What is a zero-centred RMSNorm?",
     "y = (1 + gamma) * x / RMS(x) with gamma initialized to 0, so weight decay pulls the "
     "gain toward 1; it is RMSNorm(zero_centered=True) and is how Gemma stores its gains."),
    ("What must you call after every optimizer step when training nGPT?",
     "model.project_weights(), which puts embeddings, head and the q, k, v, gate, up, o and "
     "down weights back on the unit sphere along their D axis."),
    ("Which optimizer settings does nGPT use?",
     "AdamW without weight decay and without warm-up."),
    ("What is the GRPO advantage?",
     "A_i = (r_i - mean(r)) / (std(r) + eps) over the G samples of one prompt, with the "
     "population std and eps = 1e-6 (arXiv 2402.03300)."),
    ("What is the Dr. GRPO advantage?",
     "A_i = r_i - mean(r): no division by the std (arXiv 2503.20783)."),
    ("What is the RLOO advantage?",
     "A_i = r_i - mean over j != i of r_j, which equals G / (G - 1) * (r_i - mean(r)) "
     "(arXiv 2402.14740)."),
    ("What does DAPO change in the clipping?",
     "Clip-higher: clip(rho, 1 - e_low, 1 + e_high) with e_low = 0.2 and e_high = 0.28 "
     "(arXiv 2503.14476)."),
    ("What is GSPO's ratio?",
     "A sequence-level ratio s_i = exp(mean_t(log pi(y_it) - log pi_old(y_it))), clipped "
     "per sequence and shared by every token of sample i (arXiv 2507.18071)."),
    ("What KL penalty does GRPO use?",
     "pi_ref/pi - log(pi_ref/pi) - 1 per token, weighted by beta = 0.04 (Dr. GRPO uses 0)."),
    ("What advantage does a group with equal rewards get?",
     "Zero: equal rewards carry no signal, and a group whose std is 0 gets advantage 0 "
     "exactly."),
    ("How does fake quantization pass gradients?",
     "Straight through: w + stop_gradient(dequantize(quantize(w)) - w), so the forward pass "
     "sees the quantized weights and the gradient is the identity."),
    ("Which bit widths does MLX's affine quantization support?",
     "1 to 6 bits and 8 bits, with group sizes 32, 64 and 128."),
    ("Which float quantization modes does MLX have?",
     "mxfp4, nvfp4 and mxfp8, with shared power-of-two or fp8 scales per block."),
    ("What does gated attention compute?",
     "o = SDPA(q, k, v) * sigmoid(W_g x), elementwise per head, before o_proj (arXiv "
     "2505.06708)."),
    ("What is the mixture-of-experts load-balance loss?",
     "a * E * sum_e f_e * P_e, with f_e the fraction of tokens routed to expert e and P_e "
     "its mean router probability (arXiv 2101.03961)."),
    ("What is the gated delta rule's state update?",
     "S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T and o_t = S_t q_t, with "
     "a_t = exp(g_t) and b_t = sigmoid(.) (arXiv 2412.06464)."),
    ("What is the SiLU constant nu for ApproxNorm?",
     "About 1.68: nu = 1 / sqrt(E[silu(z)^2]) for z ~ N(0, 1)."),
]


def _norm_records() -> Iterator[tuple[str, str]]:
    for name, (title, cls, formula, arxiv, params) in NORMS.items():
        yield f"What does {title} compute?", f"{formula}."
        yield f"Give the formula of {title}.", f"{formula}."
        yield f"Which paper introduced {title}?", f"arXiv {arxiv}."
        yield f"What are the parameters of {title}?", f"{params[0].upper()}{params[1:]}."
        yield (f"Which name does make_norm use for {title}?",
               f"'{name}': ln.make_norm('{name}', dims) returns a {cls}.")
        for dims in (256, 512, 1024):
            yield (f"How do I make a {title} layer of width {dims} with mlx_localnorm?",
                   f"ln.make_norm('{name}', {dims}), or ln.{cls}({dims}).")


def _placement_records() -> Iterator[tuple[str, str]]:
    for name, (title, rule, arxiv) in PLACEMENTS.items():
        yield f"What does the {title} placement compute?", f"{rule}."
        yield f"Where does {title} put the norms?", f"{rule}."
        yield f"Which paper is the {title} placement from?", f"arXiv {arxiv}."
        if name in ("ngpt", "angpt"):
            yield (f"How do I build a model with the {title} placement?",
                   f"ln.ModelArgs(placement='{name}', ...), then ln.Model(args): the "
                   f"placement brings its own normalization.")
        else:
            yield (f"How do I build a model with the {title} placement and RMSNorm?",
                   f"ln.ModelArgs(placement='{name}', norm_type='rmsnorm', ...), then "
                   f"ln.Model(args).")


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def _vec(v: list[float]) -> str:
    return "[" + ", ".join(f"{x:g}" for x in v) + "]"


def _numeric_records(rng: random.Random) -> Iterator[tuple[str, str]]:
    for _ in range(30):
        x = [rng.randint(-5, 5) for _ in range(4)]
        if not any(x):
            continue
        rms = math.sqrt(sum(v * v for v in x) / len(x))
        yield (f"Compute RMS({_vec(x)}) ignoring eps.",
               f"sqrt(mean(x^2)) = sqrt({sum(v * v for v in x)}/{len(x)}) = {_fmt(rms)}.")
        y = [v / rms for v in x]
        yield (f"What is RMSNorm({_vec(x)}) with gamma = 1 and eps ignored?",
               f"x / RMS(x) with RMS(x) = {_fmt(rms)}: [{', '.join(_fmt(v) for v in y)}].")
    for _ in range(25):
        x = [rng.randint(-4, 6) for _ in range(4)]
        mean = sum(x) / len(x)
        var = sum((v - mean) ** 2 for v in x) / len(x)
        if var == 0:
            continue
        y = [(v - mean) / math.sqrt(var) for v in x]
        yield (f"What is LayerNorm({_vec(x)}) with gamma = 1, beta = 0 and eps ignored?",
               f"mean {_fmt(mean)}, variance {_fmt(var)}: [{', '.join(_fmt(v) for v in y)}].")
    for _ in range(25):
        x = [rng.randint(-3, 3) for _ in range(3)]
        alpha = rng.choice([0.2, 0.5, 0.8, 1.0])
        y = [math.tanh(alpha * v) for v in x]
        yield (f"What is DyT({_vec(x)}) with alpha = {alpha}, gamma = 1 and beta = 0?",
               f"tanh({alpha} * x) = [{', '.join(_fmt(v) for v in y)}].")
    for _ in range(20):
        x = [rng.randint(-6, 6) for _ in range(3)]
        norm = math.sqrt(sum(v * v for v in x))
        if norm == 0:
            continue
        yield (f"What is L2Norm({_vec(x)})?",
               f"x / ||x|| with ||x|| = {_fmt(norm)}: "
               f"[{', '.join(_fmt(v / norm) for v in x)}].")
    for d_in, d_out in rng.sample([(a, b) for a in (64, 128, 256, 512, 1024)
                                   for b in (64, 128, 256, 512, 1024, 2048, 4096)], 20):
        yield (f"Which ApproxNorm constant follows a {d_in} -> {d_out} linear map with "
               f"unit-norm rows?", f"nu = sqrt(d_in / d_out) = {_fmt(math.sqrt(d_in / d_out))}.")
    for a in (0.05, 0.1, 0.2, 0.25, 0.3, 0.5):
        nu = 1 / math.sqrt((1 - a) ** 2 + a**2)
        yield (f"Which ApproxNorm constant follows the residual interpolation with a = {a}?",
               f"nu = 1 / sqrt((1 - a)^2 + a^2) = {_fmt(nu)}.")
    for layer in range(1, 13):
        yield (f"By how much does LayerNorm scaling multiply the norm output in block {layer}?",
               f"1 / sqrt({layer}) = {_fmt(1 / math.sqrt(layer))}.")
    for m, n in rng.sample([(a, b) for a in (256, 512, 768, 1024, 2048, 4096)
                            for b in (256, 512, 768, 1024, 2048, 4096)], 20):
        yield (f"What is Muon's spectral scale for a {m} x {n} matrix?",
               f"sqrt(max(1, m/n)) = {_fmt(math.sqrt(max(1, m / n)))}.")
        yield (f"What is Muon's 'adamw_rms' scale for a {m} x {n} matrix?",
               f"0.2 * sqrt(max(m, n)) = {_fmt(0.2 * math.sqrt(max(m, n)))}.")
    for _ in range(20):
        r = [rng.choice([0, 0, 1, 1, 0.5]) for _ in range(4)]
        mean = sum(r) / len(r)
        std = math.sqrt(sum((v - mean) ** 2 for v in r) / len(r))
        grpo = [0.0] * len(r) if std == 0 else [(v - mean) / (std + 1e-6) for v in r]
        yield (f"What are the GRPO advantages of rewards {_vec(r)}?",
               f"mean {_fmt(mean)}, std {_fmt(std)}: [{', '.join(_fmt(a) for a in grpo)}].")
        yield (f"What are the Dr. GRPO advantages of rewards {_vec(r)}?",
               f"r - mean(r) = [{', '.join(_fmt(v - mean) for v in r)}].")
    for bits in (2, 3, 4, 5, 6, 8):
        lo, hi = rng.choice([(-1.0, 1.0), (-0.5, 0.25), (-2.0, 1.0), (0.0, 3.0)])
        yield (f"What is the affine quantization step for {bits} bits when a group spans "
               f"[{lo:g}, {hi:g}]?",
               f"s = (max - min) / (2^{bits} - 1) = {hi - lo:g} / {2**bits - 1} = "
               f"{_fmt((hi - lo) / (2**bits - 1))}.")


def build_records(seed: int = 0) -> list[dict[str, str]]:
    """All records, shuffled with ``seed``: prompt ``Q: ...\\nA:``, completion the answer (no
    leading space: encoded on its own, a sentencepiece completion starts with one)."""
    rng = random.Random(seed)
    pairs = [*_norm_records(), *_placement_records(), *FACTS, *_numeric_records(rng)]
    unique = dict(pairs)  # a random question drawn twice is kept once (same answer)
    records = [{"prompt": f"Q: {q}\nA:", "completion": a} for q, a in unique.items()]
    rng.shuffle(records)
    return records


def write(out_dir: str | Path = INSTRUCT_DIR, seed: int = 0) -> dict[str, int]:
    """Write ``train.jsonl`` and ``valid.jsonl`` (atomically); returns the record counts."""
    records = build_records(seed)
    splits = {
        "train": [r for i, r in enumerate(records) if i % VALID_EVERY],
        "valid": records[::VALID_EVERY],
    }
    for split, rows in splits.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write_bytes(Path(out_dir) / f"{split}.jsonl", text.encode())
    return {split: len(rows) for split, rows in splits.items()}


if __name__ == "__main__":
    print(write(*sys.argv[1:2]))
