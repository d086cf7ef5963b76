"""Peak memory of a piece of work on CPU, where the allocator keeps no statistics.

Linux's VmHWM (peak resident set) is reset just before the work and read after it. glibc runs with a
fixed mmap threshold (set before the process starts) so large tensors are mapped afresh and unmapped
when freed, and the resident set follows the live tensors instead of reused heap.
"""

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return peak_bytes()


def peak_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
