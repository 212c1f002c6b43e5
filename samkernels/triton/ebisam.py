"""Triton kernel for E-BiSAM's perturbation (docs/spec.md "E-BiSAM", Alg. 3 lines 3-7; its
float64 reference is the op table's), on the skeleton of ``_multi_tensor``: one launch per dtype
group, reads w, g; writes backup, w = w + mask e.

The mask's uniforms are the raw Philox words of the noise stream (``_philox``), one per element,
regenerated, never stored.  They depend on the *logical* element index, so non-contiguous tensors
are processed as row-major copies (``elementwise=False``).

found_inf (a one-element device tensor), read by each program, never by the host: when nonzero,
only backup <- w is copied (w untouched; the norm is still computed and returned).
"""
from typing import List, Optional

import triton
import triton.language as tl
from torch import Tensor

from samkernels.ops._spec import OPS
from samkernels.triton import _multi_tensor as mt
from samkernels.triton._multi_tensor import (chunk_apply, chunk_ptrs, div, fp_args, load,
                                             load_flag, store)
from samkernels.triton._philox import (key_word, param_key, philox_words, pick_lane, quad_tile,
                                       step_words, uniforms_below)
from samkernels.triton.sam import grad_sumsq


# --------------------------------------------------------------------------------------------
# ebisam_perturb_ (E-BiSAM Alg. 3 lines 3-7): backup <- w;
#   w_i <- w_i + rho / (1 - beta) g_i / (||g|| + eps)  for the coordinates with u_i < beta
#   (u_i = the Philox uniform of element i, regenerated, never stored)
# --------------------------------------------------------------------------------------------
@triton.jit
def _ebisam_body(base, n, ptrs, args, OPT: tl.constexpr, MATH: tl.constexpr,
                 BLOCK: tl.constexpr, MASKED: tl.constexpr):
    p, g, b = ptrs
    key, seed_lo, seed_hi, step_lo, step_hi, n_below, scale = args
    offs, lane, quad = quad_tile(base, key, BLOCK // 4)
    x0, x1, x2, x3 = philox_words(quad, key_word(key), seed_lo, seed_hi, step_lo, step_hi)
    x = pick_lane(lane, x0, x1, x2, x3)  # element i: word i & 3 of block i >> 2
    # line 4: u = uniform(x) < beta  <=>  (x >> 9) < n_below (exact: _philox.uniforms_below)
    chosen = (x >> 9) < n_below
    w_raw = load(p, offs, n, MASKED)
    store(b, offs, w_raw, n, MASKED)  # backup <- w, bit-exact
    e_w = w_raw.to(MATH) + load(g, offs, n, MASKED).to(MATH) * scale  # line 5
    store(p, offs, tl.where(chosen, e_w.to(w_raw.dtype), w_raw), n, MASKED)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step_lo", "step_hi", "n_below",
                               "rs_bits", "eps_bits"],
            do_not_specialize_on_alignment=["device_step"])
def _ebisam_kernel(work, numel, ids, flag, device_step, p_tab, g_tab, b_tab, norm,
                   seed_lo: tl.int32, seed_hi: tl.int32, step_lo: tl.int32, step_hi: tl.int32,
                   n_below: tl.int32, rs_bits: tl.int64, eps_bits: tl.int64,
                   P_DT: tl.constexpr, G_DT: tl.constexpr, B_DT: tl.constexpr,
                   HAS_FLAG: tl.constexpr, ALIGNED: tl.constexpr, MATH: tl.constexpr,
                   BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, n, ptrs = chunk_ptrs(work, numel, (p_tab, g_tab, b_tab), (P_DT, G_DT, B_DT),
                                   ALIGNED)
    rho_scaled, eps = fp_args((rs_bits, eps_bits), MATH)
    # rho / (1 - beta) / (||g|| + eps), the norm read on the device
    scale = div(rho_scaled, tl.load(norm).to(MATH) + eps)
    args = (param_key(ids, t), seed_lo, seed_hi) + step_words(step_lo, step_hi, device_step) + (
        n_below.to(tl.uint32, bitcast=True), scale)
    # found_inf: backup <- w only, w stays unperturbed
    chunk_apply(_ebisam_body, start, n, ptrs, args, (), load_flag(flag, HAS_FLAG), (0, 2), MATH,
                BLOCK, CHUNK, False)


def ebisam_perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                    param_ids: List[int], grad_norm: Optional[Tensor], seed: int, step: int,
                    rho: float, beta: float, eps: float, found_inf: Optional[Tensor] = None,
                    device_step: Optional[Tensor] = None) -> Tensor:
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"ebisam_perturb_: beta must be in [0, 1), got {beta}")
    # no norm given: ||g|| on the device, float64
    norm = grad_sumsq(grads, grads, False, 0.0).sqrt() if grad_norm is None else grad_norm
    mt.launch(OPS["ebisam_perturb_"], _ebisam_kernel, [params, grads, backups], ids=param_ids,
              words=(*mt.u32_words(seed), *mt.u32_words(step), uniforms_below(beta)),
              bits=(rho / (1.0 - beta), eps), found_inf=found_inf, steps=(device_step,),
              norm=norm, elementwise=False)
    return mt.norm_result(norm, grad_norm)
