//! Expert-routing helpers without allocation (table entries; twins in [`crate::scalar`]).
//!
//! The grouped expert products themselves live with the quantized kernels
//! (`Kernels::ffn_gate_up_q4x8`).

/// Same contract as [`crate::scalar::group_by_expert`], without the scratch vector: `counts`
/// serves as the fill cursor and is restored at the end.
pub fn group_by_expert(
    expert_of: &[u32],
    n_experts: usize,
    counts: &mut [u32],
    offsets: &mut [u32],
    perm: &mut [u32],
    inv: &mut [u32],
) {
    assert!(counts.len() >= n_experts && offsets.len() > n_experts);
    assert!(perm.len() >= expert_of.len() && inv.len() >= expert_of.len());
    assert!(
        expert_of.iter().all(|&e| (e as usize) < n_experts),
        "expert index out of range"
    );
    // 1. histogram
    counts[..n_experts].iter_mut().for_each(|c| *c = 0);
    for &e in expert_of {
        counts[e as usize] += 1;
    }
    // 2. exclusive prefix sum; counts becomes the fill cursor
    offsets[0] = 0;
    for e in 0..n_experts {
        offsets[e + 1] = offsets[e] + counts[e];
        counts[e] = offsets[e];
    }
    // 3. stable placement
    for (i, &e) in expert_of.iter().enumerate() {
        let pos = counts[e as usize];
        perm[pos as usize] = i as u32;
        inv[i] = pos;
        counts[e as usize] += 1;
    }
    // 4. restore the counts
    for e in 0..n_experts {
        counts[e] = offsets[e + 1] - offsets[e];
    }
}
