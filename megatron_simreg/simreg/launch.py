"""The Triton kernels' launch arithmetic: grids, buffer sizes and the largest offsets the kernels form.

Pure integers, so a test checks long contexts (s = 131,072, many segments) without running a kernel. CUDA allows
2^31 - 1 programs on a grid's x axis but 65,535 on y: every kernel numbers its programs on one flat,
segment-major axis (`triton_jit._program`), folded onto (x, y) only past x's limit, the programs beyond the end
returning at once. The kernels turn the program index into int64 before any multiplication, so offsets into the
batch cannot overflow; what stays int32 is a position within one segment or hidden vector.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65_535
KEY_SPLITS = 16
"""At most this many forward programs share a block of anchors, each walking every KEY_SPLITS-th key block: enough
programs to fill a GPU when one segment has few row blocks (64 at s = 4,096), at 16 x 16 bytes of partials a token."""


@dataclass(frozen=True)
class Launch:
    """What the kernels of one call launch: the program counts (flat, all segments) and the forward's partials."""

    tokens: int  # b * s, the normalisation's rows
    hidden_size: int
    segments: int
    length: int  # anchors per segment
    key_length: int
    block: int
    block_k: int
    normalize_tokens: int
    symmetric: bool

    @property
    def row_blocks(self) -> int:
        return _cdiv(self.length, self.block)

    @property
    def key_blocks(self) -> int:
        return _cdiv(self.key_length, self.block)

    @property
    def splits(self) -> int:
        return min(KEY_SPLITS, self.key_blocks)

    @property
    def tiles(self) -> int:
        """Tile pairs per segment of the atomic backward: the upper triangle when the plan is symmetric."""
        n = self.row_blocks
        return n * (n + 1) // 2 if self.symmetric else n * self.key_blocks

    @property
    def programs(self) -> dict[str, int]:
        return {
            "forward": self.segments * self.row_blocks * self.splits,
            "backward": self.segments * self.tiles,
            "deterministic_backward": self.segments * self.row_blocks,
            "normalize_backward": _cdiv(self.tokens, self.normalize_tokens),
        }

    def grid(self, kernel: str) -> tuple[int, int]:
        """(x, y) covering the kernel's programs; x * y may pass their count by less than one row of x."""
        programs = self.programs[kernel]
        rows = _cdiv(programs, MAX_GRID_X)
        if rows > MAX_GRID_Y:
            raise ValueError(f"SimReg's {kernel} kernel would need {programs} programs; split the micro-batch")
        return (min(programs, MAX_GRID_X), rows)

    @property
    def partials_shape(self) -> tuple[int, int, int, int]:
        """(max, sum) of positives and negatives per anchor and split: linear in s."""
        return (self.segments, self.length, self.splits, 4)


def _cdiv(a: int, b: int) -> int:
    """Ceiling division of integers, as triton.cdiv (this module imports no Triton, so it is plain arithmetic)."""
    return -(-a // b)
