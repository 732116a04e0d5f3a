import collections
import os

import torch
import transformers as tf

MiB = 2**20
dev = "cuda"
torch.backends.cuda.matmul.allow_tf32 = True
torch.empty(1, device=dev)

def peak_report(tag, snap, top=25):
    # replay the alloc/free trace and report the live blocks at the allocated peak
    tr = snap["device_traces"][0]
    live, cur, best, best_live = {}, 0, 0, None
    for e in tr:
        a = e["action"]
        if a == "alloc":
            live[e["addr"]] = e; cur += e["size"]
            if cur > best:
                best, best_live = cur, dict(live)
        elif a in ("free_requested",):
            if e["addr"] in live:
                cur -= live.pop(e["addr"])["size"]
    print(f"== {tag}: traced peak over window {best/MiB:.1f} MiB, {len(best_live)} blocks")
    agg = collections.Counter()
    for e in best_live.values():
        fr = [f for f in e.get("frames", []) if f["filename"].endswith(".py") and "torch/utils" not in f["filename"]]
        key = " < ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in fr[:3]) or "?"
        agg[(key, e["size"])] += 1
    for (k, sz), n in sorted(agg.items(), key=lambda kv: -kv[0][1] * kv[1])[:top]:
        print(f"  {n:3d} x {sz/MiB:9.2f} MiB  {k}")

def infer_case(tag, cfg_cls, spec, b, s, dtype=torch.bfloat16):
    cfg = cfg_cls(**spec); cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    torch.set_default_dtype(torch.float32)
    model.to(dtype); model.eval(); model.config.use_cache = True
    ids = torch.randint(0, cfg.vocab_size, (b, s), device=dev)
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=200000)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        past = out.past_key_values; nxt = out.logits[:, -1:].argmax(-1); del out
        for _ in range(2):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True); past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1); del out
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    print(f"#### {tag}: base(weights+ids) {base/MiB:.1f} MiB, peak {torch.cuda.max_memory_allocated()/MiB:.1f} MiB, above base {(torch.cuda.max_memory_allocated()-base)/MiB:.1f}")
    peak_report(tag, snap)
    del model, past, nxt, ids; torch.cuda.empty_cache()

infer_case("falcon-4L b4s2048", tf.FalconConfig, dict(hidden_size=4544, num_hidden_layers=4, num_attention_heads=71,
           vocab_size=65024, multi_query=True, parallel_attn=True, bias=False, new_decoder_architecture=False, alibi=False), 4, 2048)
infer_case("llama2-13b-4L b4s2048", tf.LlamaConfig, dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=4,
           num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096), 4, 2048)
infer_case("llama2-7b-4L fp16 b8s2048", tf.LlamaConfig, dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
           num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096), 8, 2048, torch.float16)
# fp32 GQA backend choice and memory
def mk(b, h, s, d, dt, rg=True):
    return torch.randn(b, s, h, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_(rg)
q, k, v = mk(2,32,1024,64,torch.float32), mk(2,8,1024,64,torch.float32), mk(2,8,1024,64,torch.float32)
print("fp32 gqa choice", int(torch._fused_sdp_choice(q, k, v, None, 0.0, True, enable_gqa=True)))
torch.cuda.synchronize(); b0 = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
torch.cuda.synchronize(); print("fp32 gqa fwd peak", (torch.cuda.max_memory_allocated()-b0)/MiB, "after", (torch.cuda.memory_allocated()-b0)/MiB, "out", o.numel()*4/MiB)
b1 = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
o.backward(torch.ones_like(o)); torch.cuda.synchronize()
print("fp32 gqa bwd peak", (torch.cuda.max_memory_allocated()-b1)/MiB, "after", (torch.cuda.memory_allocated()-b1)/MiB)
