#!/usr/bin/env python3
"""Minimal Llama4ForCausalLM (text-only) HF safetensors -> GGUF (bf16) converter.

Why this exists: ik_llama.cpp's own convert_hf_to_gguf.py (as vendored in the
ik-llama-cpp-python 0.1.5 sdist) has no Llama4 model class ("Llama4ForCausalLM"
is not registered), while the ik C++ runtime does support arch "llama4".
This script follows the tensor mapping of mainline llama.cpp's Llama4Model
converter:
  * experts.gate_up_proj [E, hidden, 2I]  -> ffn_gate_exps / ffn_up_exps [E, I, hidden]
    (split last dim: first half gate, second half up, then transpose)
  * experts.down_proj    [E, I, hidden]   -> ffn_down_exps [E, hidden, I] (transpose)
  * q/k are NOT permuted (Llama4 HF already uses the interleaved rope layout)
  * llama3 rope scaling -> rope_freqs tensor
It reads the safetensors files directly (no torch needed): bf16 bits are copied
unchanged (uint16), so the output is an exact bf16 GGUF.

Usage: PYTHONPATH=<ik>/gguf-py python3 l4_hf_to_gguf.py HF_DIR TOKENIZER_JSON OUT.gguf
The checkpoint may have no tokenizer; TOKENIZER_JSON is any Llama 4 tokenizer.json
(vocabulary is padded with [PAD<i>] up to config.vocab_size).
"""
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import gguf


def open_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    base = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "BF16":
            raise SystemExit(f"{path}: tensor {name} has dtype {info['dtype']}, expected BF16")
        s, e = info["data_offsets"]
        arr = mm[base + s: base + e].view(np.uint16).reshape(info["shape"])
        out[name] = arr
    return out


def main():
    hf_dir, tok_json, out_path = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    cfg = json.loads((hf_dir / "config.json").read_text())
    if cfg.get("text_config"):
        cfg = {**cfg, **cfg["text_config"]}
    tensors = {}
    for st in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(open_safetensors(st))

    n_layer = cfg["num_hidden_layers"]
    n_embd = cfg["hidden_size"]
    n_head = cfg["num_attention_heads"]
    n_kv = cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim", n_embd // n_head)
    n_vocab = cfg["vocab_size"]
    ff_moe = cfg["intermediate_size"]
    ff_mlp = cfg["intermediate_size_mlp"]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 500000.0))

    w = gguf.GGUFWriter(out_path, arch="llama4")
    w.add_name("l4-mini")
    w.add_vocab_size(n_vocab)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(ff_mlp)
    w.add_expert_feed_forward_length(ff_moe)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    # the vendored gguf-py lacks the Keys constant; write the key ik reads directly
    w.add_uint32("llama4.interleave_moe_layer_step", cfg["interleave_moe_layer_step"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)

    # --- tokenizer (BPE, llama4 pre-tokenizer) ---
    tj = json.loads(tok_json.read_text())
    vocab = tj["model"]["vocab"]
    toks = [None] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    for t, i in vocab.items():
        if i < n_vocab:
            toks[i] = t
            types[i] = gguf.TokenType.NORMAL
    for a in tj.get("added_tokens", []):
        if a["id"] < n_vocab:
            toks[a["id"]] = a["content"]
            types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    for i in range(n_vocab):
        if toks[i] is None:
            toks[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama4")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_add_bos_token(True)
    w.add_bos_token_id(cfg.get("bos_token_id", 200000))
    eos = cfg.get("eos_token_id", 200008)
    w.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    if cfg.get("pad_token_id") is not None:
        w.add_pad_token_id(cfg["pad_token_id"])

    BF16 = gguf.GGMLQuantizationType.BF16

    class Lazy:
        """Transposed view whose contiguous copy is made only while writing."""
        def __init__(self, view):
            self.view, self.shape, self.dtype = view, view.shape, view.dtype
            self.nbytes = view.nbytes

        def tofile(self, f):
            np.ascontiguousarray(self.view).tofile(f)

    def add(name, arr):
        w.add_tensor(name, arr, raw_dtype=BF16)

    def addf32(name, arr):
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))

    # llama3 rope scaling factors (same formula as mainline LlamaModel.generate_extra_tensors)
    if rope.get("rope_type") == "llama3":
        base = float(rope_theta)
        dim = head_dim
        factor = rope.get("factor", 8.0)
        low = rope.get("low_freq_factor", 1.0)
        high = rope.get("high_freq_factor", 4.0)
        old_ctx = rope.get("original_max_position_embeddings", 8192)
        low_wl = old_ctx / low
        high_wl = old_ctx / high
        freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factors = []
        for f in freqs:
            wl = 2 * math.pi / f
            if wl < high_wl:
                factors.append(1)
            elif wl > low_wl:
                factors.append(factor)
            else:
                smooth = (old_ctx / wl - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        addf32("rope_freqs.weight", np.array(factors, dtype=np.float32))

    def bf16_to_f32(a):
        return (np.asarray(a).astype(np.uint32) << 16).view(np.float32)

    add("token_embd.weight", tensors["model.embed_tokens.weight"])
    addf32("output_norm.weight", bf16_to_f32(tensors["model.norm.weight"]))
    add("output.weight", tensors["lm_head.weight"] if "lm_head.weight" in tensors
        else tensors["model.embed_tokens.weight"])
    for i in range(n_layer):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        addf32(b + "attn_norm.weight", bf16_to_f32(tensors[p + "input_layernorm.weight"]))
        addf32(b + "ffn_norm.weight", bf16_to_f32(tensors[p + "post_attention_layernorm.weight"]))
        add(b + "attn_q.weight", tensors[p + "self_attn.q_proj.weight"])
        add(b + "attn_k.weight", tensors[p + "self_attn.k_proj.weight"])
        add(b + "attn_v.weight", tensors[p + "self_attn.v_proj.weight"])
        add(b + "attn_output.weight", tensors[p + "self_attn.o_proj.weight"])
        if p + "feed_forward.router.weight" in tensors:
            addf32(b + "ffn_gate_inp.weight", bf16_to_f32(tensors[p + "feed_forward.router.weight"]))  # router kept f32 as mainline does
            gu = tensors[p + "feed_forward.experts.gate_up_proj"]  # [E, hidden, 2I]
            half = gu.shape[-1] // 2
            add(b + "ffn_gate_exps.weight", Lazy(gu[:, :, :half].transpose(0, 2, 1)))
            add(b + "ffn_up_exps.weight", Lazy(gu[:, :, half:].transpose(0, 2, 1)))
            dn = tensors[p + "feed_forward.experts.down_proj"]  # [E, I, hidden]
            add(b + "ffn_down_exps.weight", Lazy(dn.transpose(0, 2, 1)))
            add(b + "ffn_gate_shexp.weight", tensors[p + "feed_forward.shared_expert.gate_proj.weight"])
            add(b + "ffn_up_shexp.weight", tensors[p + "feed_forward.shared_expert.up_proj.weight"])
            add(b + "ffn_down_shexp.weight", tensors[p + "feed_forward.shared_expert.down_proj.weight"])
        else:
            add(b + "ffn_gate.weight", tensors[p + "feed_forward.gate_proj.weight"])
            add(b + "ffn_up.weight", tensors[p + "feed_forward.up_proj.weight"])
            add(b + "ffn_down.weight", tensors[p + "feed_forward.down_proj.weight"])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    print("wrote", out_path)


if __name__ == "__main__":
    main()
