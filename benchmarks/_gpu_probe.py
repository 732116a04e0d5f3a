import json, os, subprocess, sys, time
import torch
print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), "cuda", torch.version.cuda)
print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for pkg in ("transformers", "peft", "bitsandbytes", "nvidia-cudnn-cu13"):
    r = subprocess.run([sys.executable, "-m", "pip", "show", pkg], capture_output=True, text=True)
    print(pkg, [l for l in r.stdout.splitlines() if l.startswith("Version")])
from torch.nn.attention import SDPBackend
dev = "cuda"
MiB = 2**20
torch.empty(1, device=dev)
def choice(q, k, v, mask=None, drop=0.0, causal=True, gqa=False):
    return {0:"math",1:"flash",2:"efficient",3:"cudnn",-1:"error"}.get(int(torch._fused_sdp_choice(q, k, v, mask, drop, causal, enable_gqa=gqa)), "?")
bf = torch.bfloat16
def mk(b, h, s, d, dt, rg=True):
    return torch.randn(b, s, h, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_(rg)
cases = {
 "llama1b bf16 gqa train": (mk(4,32,2048,64,bf), mk(4,8,2048,64,bf), mk(4,8,2048,64,bf), None, 0.0, True, True),
 "llama1b bf16 gqa infer": (mk(4,32,2048,64,bf,False), mk(4,8,2048,64,bf,False), mk(4,8,2048,64,bf,False), None, 0.0, True, True),
 "llama8b hd128 train": (mk(1,32,2048,128,bf), mk(1,8,2048,128,bf), mk(1,8,2048,128,bf), None, 0.0, True, True),
 "gpt2 fp32": (mk(8,12,1024,64,torch.float32), mk(8,12,1024,64,torch.float32), mk(8,12,1024,64,torch.float32), None, 0.1, True, False),
 "gpt2 bf16 drop0.1": (mk(16,12,1024,64,bf), mk(16,12,1024,64,bf), mk(16,12,1024,64,bf), None, 0.1, True, False),
 "qwen hd64 h14 kv2": (mk(4,14,1024,64,bf), mk(4,2,1024,64,bf), mk(4,2,1024,64,bf), None, 0.0, True, True),
 "falcon mqa mask": (mk(4,71,2048,64,bf,False), mk(4,1,2048,64,bf,False), mk(4,1,2048,64,bf,False), torch.ones(4,1,2048,2048,device=dev,dtype=torch.bool).tril(), 0.0, False, False),
 "decode q1 gqa": (mk(8,32,1,128,bf,False), mk(8,8,2049,128,bf,False), mk(8,8,2049,128,bf,False), None, 0.0, False, True),
 "llama2 fp16 mha": (mk(8,32,2048,128,torch.float16,False), mk(8,32,2048,128,torch.float16,False), mk(8,32,2048,128,torch.float16,False), None, 0.0, True, False),
}
for name, (q,k,v,m,d,c,g) in cases.items():
    try:
        print("choice", name, choice(q,k,v,m,d,c,g))
    except Exception as e:
        print("choice", name, "ERR", e)
del cases
torch.cuda.synchronize(); torch.cuda.empty_cache()
# memory of sdpa fwd/bwd (llama1b-like, bf16 gqa)
def sdpa_mem(b, h, hk, s, d, dt, gqa=True, drop=0.0):
    q = mk(b,h,s,d,dt); k = mk(b,hk,s,d,dt); v = mk(b,hk,s,d,dt)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, dropout_p=drop)
    torch.cuda.synchronize()
    fwd_peak = torch.cuda.max_memory_allocated() - base; after = torch.cuda.memory_allocated() - base
    g = torch.ones_like(o)
    torch.cuda.synchronize(); base2 = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    o.backward(g)
    torch.cuda.synchronize()
    bwd_peak = torch.cuda.max_memory_allocated() - base2; after2 = torch.cuda.memory_allocated() - base2
    out_b = o.numel() * o.element_size()
    print(f"sdpa b{b} h{h}/{hk} s{s} d{d} {dt} drop{drop}: out={out_b/MiB:.2f}MiB fwd_peak={fwd_peak/MiB:.2f} after_fwd={after/MiB:.2f} bwd_peak={bwd_peak/MiB:.2f} after_bwd={after2/MiB:.2f} qkv_bytes={(q.numel()+k.numel()+v.numel())*q.element_size()/MiB:.2f}")
    del q,k,v,o,g
    torch.cuda.empty_cache()
sdpa_mem(4,32,8,2048,64,bf)
sdpa_mem(1,32,8,2048,128,bf)
sdpa_mem(4,32,32,2048,64,bf, gqa=False)
sdpa_mem(8,12,12,1024,64,torch.float32, gqa=False, drop=0.1)
sdpa_mem(16,12,12,1024,64,bf, gqa=False, drop=0.1)
# cuBLAS workspace seen in allocated
r = subprocess.run([sys.executable, "-c", """
import torch, threading
torch.empty(1, device='cuda')
a = torch.randn(512, 512, device='cuda', dtype=torch.bfloat16, requires_grad=True)
torch.cuda.synchronize(); m0 = torch.cuda.memory_allocated()
b = a @ a; torch.cuda.synchronize(); m1 = torch.cuda.memory_allocated()
b.sum().backward(); torch.cuda.synchronize(); m2 = torch.cuda.memory_allocated()
x = torch.nn.functional.linear(a, a); torch.cuda.synchronize(); m3 = torch.cuda.memory_allocated()
print('cublas ws MiB after fwd mm', (m1-m0-512*512*2)/2**20, 'after bwd', (m2-m1-512*512*2)/2**20, 'after linear', (m3-m2-512*512*2)/2**20)
print('env', {k:v for k,v in __import__('os').environ.items() if 'CUBLAS' in k})
"""], capture_output=True, text=True)
print(r.stdout, r.stderr[-2000:])
