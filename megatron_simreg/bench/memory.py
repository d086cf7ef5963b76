"""Peak memory of a piece of work: `reset_peak(device)` just before it, `peak_bytes(device)` after it.

On a GPU, the caching allocator's own statistics (`torch.cuda.max_memory_allocated`), after the queued work ends.
On CPU, where the allocator keeps none, Linux's VmHWM (peak resident set) is reset and read. glibc then runs with
a fixed mmap threshold (`MMAP_ENV`, set before the process starts) so large tensors are mapped afresh and unmapped
when freed, and the resident set follows the live tensors instead of reused heap.
"""

import torch

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def reset_peak(device: str = "cpu") -> int:
    """Start a measurement; the bytes in use now."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return peak_bytes()


def peak_bytes(device: str = "cpu") -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
