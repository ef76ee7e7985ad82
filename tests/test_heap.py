"""--heap: glibc keeps freed blocks for reuse, so a CPU forward pass stops page-faulting."""

import json
import subprocess
import sys

import pytest

from embedx._malloc import is_glibc, resolve_heap

pytestmark = pytest.mark.skipif(not is_glibc(), reason="the heap switch is glibc's mallopt")

# the default architecture (random weights, no download) at batch 4, as the CPU engine runs it:
# channels-last, the previous batch's output alive while the next runs. Counts the minor page
# faults of each batch after a warm-up
_FAULTS = r"""
import json, resource, statistics, sys
import timm, torch
if sys.argv[1] == "keep":
    from embedx._malloc import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
torch.manual_seed(0)
model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
model = model.to(memory_format=torch.channels_last)
x = torch.randn(4, 3, 224, 224).contiguous(memory_format=torch.channels_last)
faults, outs = [], []
with torch.inference_mode():
    for _ in range(16):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        outs = outs[-1:] + [model(x)]
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"median_faults_per_batch": statistics.median(faults[4:]), "faults": faults,
                  "same": bool(torch.allclose(outs[0], outs[1]))}))
"""


def _faults(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_keeping_freed_memory_stops_the_page_faults_of_each_batch():
    release, keep = _faults("release"), _faults("keep")
    # glibc's default hands big freed blocks back to the OS, so every batch touches fresh
    # zeroed pages again (measured: ~13,000 faults, 50 MB, a batch); kept, they are reused
    assert release["median_faults_per_batch"] > 1000, release
    assert keep["median_faults_per_batch"] < 10, keep
    assert keep["same"] and release["same"]


@pytest.mark.parametrize("choice, device, kept", [
    ("auto", "cpu", True), ("auto", "cuda", False), ("auto", "cuda:1", False),
    ("keep", "cuda", True), ("release", "cpu", False),
])
def test_resolve_heap(choice, device, kept):
    assert resolve_heap(choice, device) is kept
