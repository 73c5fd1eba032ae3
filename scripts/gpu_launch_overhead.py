"""Host cost of one Triton launch on this machine: the JIT dispatch (`kernel[grid](...)`) against a launch through
the compiled kernel's own launcher (binding and specialization skipped), beside torch ops, for a kernel with 24
arguments like ours. Usage (GPU machine): PYTHONPATH=src python3 scripts/gpu_launch_overhead.py
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl


@triton.jit
def _many_args_kernel(
    a, b, c, d, e, f, g, h, n0, n1, n2, n3, s0, s1, s2, s3, s4, s5, s6, s7,
    BLOCK: tl.constexpr, X: tl.constexpr, Y: tl.constexpr, Z: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n0
    tl.store(b + offs, tl.load(a + offs, mask=m) + X, mask=m)


def per_call_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / n * 1e6


def main() -> None:
    x = torch.randn(4096, device="cuda")
    ptrs = [x, torch.empty_like(x)] + [torch.empty(64, device="cuda") for _ in range(6)]
    ints = [4096, 77, 1, 16] + [3, 5, 4096, 8192, 1, 12, 33, 64]
    consts = dict(BLOCK=1024, X=1, Y=2, Z=3)
    grid = (4,)
    rows = {}
    rows["triton jit dispatch"] = per_call_us(lambda: _many_args_kernel[grid](*ptrs, *ints, **consts))
    compiled = _many_args_kernel[grid](*ptrs, *ints, **consts)
    from triton import knobs

    stream = torch.cuda.current_stream().cuda_stream
    values = [*ptrs, *ints, *consts.values()]
    meta = compiled.launch_metadata(grid, stream, *values)
    run, fn, packed = compiled.run, compiled.function, compiled.packed_metadata
    enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook

    def direct():
        run(4, 1, 1, stream, fn, packed, meta, enter, exit_, *values)

    try:
        rows["compiled launcher (all args)"] = per_call_us(direct)
    except Exception as err:  # noqa: BLE001 - a probe: report what this Triton wants
        print("direct launch with constexprs failed:", err)
        values = [*ptrs, *ints]
        rows["compiled launcher (runtime args)"] = per_call_us(direct)
    torch.testing.assert_close(ptrs[1], x + 1)
    rows["torch.empty"] = per_call_us(lambda: torch.empty(4096, device="cuda"))
    rows["torch add"] = per_call_us(lambda: torch.add(x, 1))
    w = torch.randn(2816, 2816, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(706, 2816, device="cuda", dtype=torch.bfloat16)
    rows["torch linear 706x2816x2816"] = per_call_us(lambda: torch.nn.functional.linear(a, w), n=500)
    print(f"\n{torch.cuda.get_device_name()}, triton {triton.__version__}, torch {torch.__version__}")
    for name, us in rows.items():
        print(f"  {name:34} {us:7.2f} us a call (host)")


if __name__ == "__main__":
    main()
