//! Named observation points of the forward pass, for tests that compare intermediates with a
//! reference (parity) and for tools that collect activation statistics (an importance matrix
//! needs the input rows of every matrix product, per routed expert too).
//!
//! A [`Probe`] is passed to [`Model::forward_probed`](super::Model::forward_probed); without
//! one (`None`, what [`Model::forward`](super::Model::forward) passes) nothing is gathered and
//! nothing is computed differently: the logits are the same bits with or without a probe.

/// An input of matrix products (the rows that multiply a weight matrix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// The normed attention input, shared by `wq`, `wk` and `wv` (`hidden_size` wide).
    Qkv,
    /// The attention output before `wo` (`num_heads * head_dim` wide).
    Wo,
    /// The normed FFN input of a dense layer, shared by `ffn_gate` and `ffn_up`.
    FfnGateUp,
    /// `silu(gate) * up` before `ffn_down` (`intermediate_size` wide).
    FfnDown,
    /// The normed FFN input of an MoE layer: the input of the router and of the shared
    /// expert's gate and up projections.
    Moe,
    /// `silu(gate) * up` of the shared expert before `shared_down`.
    SharedDown,
    /// The rows routed to expert `e` before its gate and up projections (Llama 4: already
    /// scaled by the router's sigmoid, as the expert sees them).
    ExpertGateUp(usize),
    /// `silu(gate) * up` of the rows routed to expert `e`, before its down projection.
    ExpertDown(usize),
    /// The final normed rows before the output projection (layer index = `num_layers`).
    Output,
}

/// Where in the forward pass a value is observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Point {
    /// The residual stream `[n, hidden]`: after the embedding (layer 0) and after each layer
    /// `i` (layer `i + 1`), as transformers' `output_hidden_states`.
    Hidden,
    /// Layer `i`'s attention block output `[n, hidden]` (after `wo`, before the residual add).
    AttnOut,
    /// Layer `i`'s FFN block output `[n, hidden]` (dense, or MoE with its shared expert),
    /// before the residual add.
    FfnOut,
    /// Layer `i`'s router logits `[n, num_experts]` (MoE layers only).
    RouterLogits,
    /// The input rows of a matrix product `[rows, k]`.
    MatInput(Input),
}

impl Point {
    /// A short name (`hidden`, `attn_out`, `ffn_out`, `router_logits`, `input`).
    pub fn name(self) -> &'static str {
        match self {
            Point::Hidden => "hidden",
            Point::AttnOut => "attn_out",
            Point::FfnOut => "ffn_out",
            Point::RouterLogits => "router_logits",
            Point::MatInput(_) => "input",
        }
    }
}

/// An observer of the forward pass's intermediates.
pub trait Probe {
    /// Whether this probe wants `point` (asked before anything is gathered for it).
    fn wants(&self, point: Point) -> bool {
        let _ = point;
        true
    }
    /// `data` (row-major, `rows × width` as the point says) of `point` at `layer`.
    fn observe(&mut self, layer: usize, point: Point, data: &[f32]);
}

/// The probe of a forward call, `None` for none.
pub(crate) type ProbeOpt<'a, 'b> = &'a mut Option<&'b mut dyn Probe>;

/// Hand `data` to the probe if there is one and it wants `point`.
#[inline]
pub(crate) fn see(probe: ProbeOpt, layer: usize, point: Point, data: &[f32]) {
    if let Some(p) = probe {
        if p.wants(point) {
            p.observe(layer, point, data);
        }
    }
}

/// A closure that sees the residual stream only (what
/// [`Model::forward_observed`](super::Model::forward_observed) takes).
pub(crate) struct HiddenOnly<'a, 'b>(pub &'a mut (dyn FnMut(usize, &str, &[f32]) + 'b));

impl Probe for HiddenOnly<'_, '_> {
    fn wants(&self, point: Point) -> bool {
        point == Point::Hidden
    }
    fn observe(&mut self, layer: usize, point: Point, data: &[f32]) {
        (self.0)(layer, point.name(), data)
    }
}
