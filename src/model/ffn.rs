//! The dense feed-forward block: SwiGLU `y = down(silu(gate(x)) * up(x))`, used by dense layers
//! and by the shared expert of MoE layers.

use super::probe::{see, Input, Point, ProbeOpt};
use crate::ops::{self, matmul, quantize_for, Act, Mat, Par};
use ferroq_kernels::{BlockQ8A, Kernels};

/// The scratch a SwiGLU works in.
pub(super) struct SwigluBufs<'a> {
    /// Quantized activations, `m * max(hs, inter) / 32` blocks.
    pub q8: &'a mut [BlockQ8A],
    /// `0, 1, ..` (at least `m`): row indices of a plain product.
    pub iota: &'a [u32],
    /// `m * inter` each.
    pub gate: &'a mut [f32],
    pub up: &'a mut [f32],
}

/// SwiGLU FFN `y = down(silu(gate(x)) * up(x))` of `m` rows of `x` (`hs` wide) with
/// intermediate width `inter`, into `y` (`m * hs`). The probe sees the input of the down
/// projection as `down_in` of `layer`.
#[allow(clippy::too_many_arguments)]
pub(super) fn swiglu(
    kern: &Kernels,
    par: &Par,
    w: [Mat; 3],
    hs: usize,
    inter: usize,
    x: &[f32],
    m: usize,
    b: SwigluBufs,
    y: &mut [f32],
    probe: ProbeOpt,
    layer: usize,
    down_in: Input,
) {
    let [wg, wu, wd] = w;
    let SwigluBufs { q8, iota, gate, up } = b;
    let qa = quantize_for(kern, par, x, hs, m, q8, &[wg, wu]);
    let a = Act {
        x,
        k: hs,
        n_tok: m,
        q8: qa,
    };
    // gate <- silu(gate x) * (up x)
    ops::gate_up(kern, par, wg, wu, inter, &a, iota, gate, up);
    let g = &gate[..m * inter];
    see(probe, layer, Point::MatInput(down_in), g);
    let qa = quantize_for(kern, par, g, inter, m, q8, &[wd]);
    let a = Act {
        x: g,
        k: inter,
        n_tok: m,
        q8: qa,
    };
    matmul(kern, par, wd, hs, &a, y, hs);
}
