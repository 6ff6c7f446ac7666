"""Splitting a tensor into row ranges (first dimension) so elementwise work needs bounded memory."""
from typing import List, Optional, Sequence, Tuple


def row_chunks(shape: Sequence[int], chunk_bytes: Optional[int]) -> List[Optional[Tuple[int, int]]]:
    """[None] (the whole tensor) or row ranges [start, stop) of at most ~chunk_bytes in fp32 each."""
    if chunk_bytes is None or len(shape) == 0 or shape[0] <= 1:
        return [None]
    row = 4  # fp32 temporaries dominate
    for s in shape[1:]:
        row *= s
    rows = max(1, chunk_bytes // max(row, 1))
    if rows >= shape[0]:
        return [None]
    return [(s, min(s + rows, shape[0])) for s in range(0, shape[0], rows)]
