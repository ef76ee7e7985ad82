"""Scratch probe (session 16): where the batched device resize spends its time, vs per-size."""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tempfile
import torch
from bench_gpu import make_jpegs
from embedx import _tensor_decode as td
from embedx._tensor_decode import TensorPreprocess, _decoder, batched_resize_crop, resize_crop_batch, _groups, _axis_weights, _copy_all
from embedx._resize import resized_size, crop_anchor

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
folder = make_jpegs(n, Path(tempfile.mkdtemp()))
files = sorted(folder.rglob("*.jpg"))
data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
dec = _decoder("torchcodec")
batches = [dec(data[i:i + 256], dev) for i in range(0, len(data), 256)]
pre = TensorPreprocess(256, (224, 224), "bicubic")

def sync():
    if dev.startswith("cuda"):
        torch.cuda.synchronize()

def per_size(b):
    by = {}
    for i, x in enumerate(b):
        by.setdefault(tuple(x.shape[1:]), []).append(i)
    out = [None] * len(b)
    for idxs in by.values():
        g = torch.stack([b[i] for i in idxs]) if len(idxs) > 1 else b[idxs[0]][None]
        r = resize_crop_batch(g, pre)
        for j, i in enumerate(idxs):
            out[i] = r[j]
    return torch.stack(out)

def batched(b):
    return torch.stack(batched_resize_crop(b, pre))

def batched_parts(b, mm_dtype=None, split=False, stage=None):
    ch, cw = pre.crop
    shapes = [(int(x.shape[1]), int(x.shape[2])) for x in b]
    res_all = []
    for group in _groups(shapes, td.GROUP_PIXELS, td.GROUP_SLACK):
        hm = max(shapes[i][0] for i in group); wm = max(shapes[i][1] for i in group); g = len(group)
        x = torch.zeros((g, hm, 3, wm), dtype=torch.float32, device=dev)
        wy = torch.zeros((g, ch, hm), dtype=torch.float32, device=dev)
        wx = torch.zeros((g, cw, wm), dtype=torch.float32, device=dev)
        dst, src = [], []
        for j, i in enumerate(group):
            h, w = shapes[i]
            nh, nw = resized_size(h, w, 256)
            top, left = crop_anchor(nh, nw, ch, cw)
            dst += [x[j, :h, :, :w], wy[j, :, :h], wx[j, :, :w]]
            src += [b[i].permute(1, 0, 2), _axis_weights(h, nh, top, ch, "bicubic", dev), _axis_weights(w, nw, left, cw, "bicubic", dev)]
        if stage == "prep":
            continue
        _copy_all(dst, src)
        if stage == "copy":
            continue
        if split:
            xb = x.to(torch.bfloat16)  # exact: integers < 256
            wyh = wy.to(torch.bfloat16); wyl = (wy - wyh.float()).to(torch.bfloat16)
            rows = (mm(wyh, xb.view(g, hm, 3 * wm)) + mm(wyl, xb.view(g, hm, 3 * wm))).view(g, ch * 3, wm)
            rh = rows.to(torch.bfloat16); rl = (rows - rh.float()).to(torch.bfloat16)
            wxt = wx.transpose(1, 2); wxh = wxt.to(torch.bfloat16); wxl = (wxt - wxh.float()).to(torch.bfloat16)
            res = (mm(rh, wxh) + mm(rh, wxl) + mm(rl, wxh)).view(g, ch, 3, cw)
        else:
            rows = torch.bmm(wy, x.view(g, hm, 3 * wm)).view(g, ch * 3, wm)
            res = torch.bmm(rows, wx.transpose(1, 2)).view(g, ch, 3, cw)
        res_all.append((group, res))
    return res_all

def mm(a, b):
    try:
        return torch.bmm(a, b, out_dtype=torch.float32)
    except Exception:
        return torch.bmm(a.float(), b.float())

def t(fn, reps=3):
    fn(batches[0]); sync()
    best = 1e9
    for _ in range(reps):
        s = time.perf_counter()
        for b in batches:
            fn(b)
        sync()
        best = min(best, time.perf_counter() - s)
    return n / best

ref = per_size(batches[0])
got = batched(batches[0])
print("batched vs per-size max diff", (ref - got).abs().max().item())
for label, kw in (("fp32", {}), ("bf16x3", {"split": True})):
    worst = 0.0
    for group, res in batched_parts(batches[0], **kw):
        for j, i in enumerate(group):
            worst = max(worst, (res[j].permute(1, 0, 2) - ref[i]).abs().max().item())
    print(f"{label} parts vs per-size max diff {worst:.2e}")
print("groups of batch 0:", [len(g) for g in _groups([(int(x.shape[1]), int(x.shape[2])) for x in batches[0]], td.GROUP_PIXELS, td.GROUP_SLACK)])
for name, fn in [("per_size", per_size), ("batched", batched),
                 ("batched_prep_only", lambda b: batched_parts(b, stage="prep")),
                 ("batched_prep_copy", lambda b: batched_parts(b, stage="copy")),
                 ("batched_fp32_nostack", lambda b: batched_parts(b)),
                 ("batched_bf16x3", lambda b: batched_parts(b, split=True))]:
    print(f"{name:>22}: {t(fn):9.0f} img/s", flush=True)
torch.backends.cuda.matmul.allow_tf32 = True
print(f"{'batched_tf32':>22}: {t(lambda b: batched_parts(b)):9.0f} img/s", flush=True)
torch.backends.cuda.matmul.allow_tf32 = False
for gp in (2 ** 22, 2 ** 26):
    td.GROUP_PIXELS = gp
    print(f"{'batched GROUP_PIXELS=' + str(gp):>22}: {t(batched):9.0f} img/s", flush=True)
