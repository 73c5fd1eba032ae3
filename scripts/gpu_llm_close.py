"""GPU check for `LLM.close()`: after it, memory_allocated() is back where it was and a second LLM starts.

Usage on a GPU machine: PYTHONPATH=src python scripts/gpu_llm_close.py
The same check is a `cuda` test (tests/gpu/test_llm_on_cuda.py); this script stays for scripts/gpu_decode_*.sh.
"""

import gc
import sys
import tempfile

import torch

from nvfp4kit import LLM, SamplingParams
from nvfp4kit.testing.tiny import write_tiny_checkpoint


def report_live_tensors(top: int = 8) -> None:
    """What still holds device memory: the largest live CUDA tensors and the types that refer to them."""
    gc.collect()
    live = [o for o in gc.get_objects() if torch.is_tensor(o) and o.is_cuda]
    live.sort(key=lambda t: -t.untyped_storage().nbytes())
    for t in live[:top]:
        owners = [type(r).__name__ for r in gc.get_referrers(t) if r is not live][:4]
        print(f"  live {tuple(t.shape)} {t.dtype} {t.untyped_storage().nbytes() >> 10} KiB <- {owners}")


def main() -> int:
    folder = write_tiny_checkpoint(tempfile.mkdtemp(), shape="moe", dtype=torch.bfloat16)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    before = torch.cuda.memory_allocated()
    llm = LLM(folder, device="cuda", gpu_memory_utilization=0.5)
    first = llm.generate("Hello", params)[0].token_ids
    held = torch.cuda.memory_allocated()
    llm.close()
    after_close = torch.cuda.memory_allocated()
    if after_close > before:
        report_live_tensors()
    with LLM(folder, device="cuda", gpu_memory_utilization=0.5) as again:
        second = again.generate("Hello", params)[0].token_ids
    del again
    gc.collect()
    after_with = torch.cuda.memory_allocated()
    # what may stay: the kernels' per-device split-K arrival counters (16 KiB, made once per process)
    slack = 1 << 20
    ok = after_close - before <= slack and after_with - before <= slack and first == second
    print(
        f"allocated: before {before} B, with the LLM {held >> 20} MiB, after close {after_close} B, "
        f"after with-block {after_with} B; same tokens: {first == second} -> {'OK' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
