"""A flat (C-order) range of an array as hyperslabs: the boxes an HDF5 virtual dataset maps.

A shard's slice file holds a canonical range [lo, hi) of a vector as one flat dataset; in a
tensor of shape (d0, d1, ...) that range is in general not one box (it starts and ends in
the middle of rows), so the checkpoint's virtual dataset maps it as a few boxes, each of
which is contiguous in C order: at most 2 * ndim - 1 of them.

MPI-free and h5py-free: dbmpi.io.checkpoint builds the virtual datasets from these.
"""
from __future__ import annotations

import math


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[int, tuple[slice, ...]]]:
    """Boxes covering flat positions [start, stop) of an array of `shape`, in order, as
    (flat position of the box's first element, one slice per dimension). Each box's
    elements are contiguous in C order, so the box equals the flat range it starts."""
    if not 0 <= start <= stop <= math.prod(shape):
        raise ValueError(f"flat range [{start}, {stop}) outside shape {shape}")
    boxes: list[tuple[int, tuple[slice, ...]]] = []
    _split(tuple(shape), start, stop, (), 0, boxes)
    return boxes


def _split(shape: tuple[int, ...], start: int, stop: int, prefix: tuple[slice, ...], base: int,
           boxes: list) -> None:
    """Append to `boxes` the boxes of [start, stop) within a sub-array of `shape` whose
    outer indices are fixed by `prefix` and whose first element is at flat `base`."""
    if start >= stop:
        return
    if not shape:  # a scalar (the last dimension already fixed)
        boxes.append((base, prefix))
        return
    row = math.prod(shape[1:])
    first, last = start // row, (stop - 1) // row  # the rows [start, stop) touches
    whole_from = first if start % row == 0 else first + 1
    whole_to = last + 1 if stop % row == 0 else last  # rows [whole_from, whole_to) are whole
    if whole_from > whole_to:  # inside one row
        _split(shape[1:], start - first * row, stop - first * row, prefix + (slice(first, first + 1),),
               base + first * row, boxes)
        return
    if whole_from > first:  # the tail of the first row
        _split(shape[1:], start - first * row, row, prefix + (slice(first, first + 1),), base + first * row, boxes)
    if whole_to > whole_from:
        full = tuple(slice(0, d) for d in shape[1:])
        boxes.append((base + whole_from * row, prefix + (slice(whole_from, whole_to),) + full))
    if whole_to <= last:  # the head of the last row
        _split(shape[1:], 0, stop - last * row, prefix + (slice(last, last + 1),), base + last * row, boxes)


__all__ = ["flat_range_boxes"]
