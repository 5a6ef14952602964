#!/usr/bin/env python3
"""Writes a small seed corpus of safetensors files for safetensors_fuzz.

Each file is written in both input modes of the target (see
safetensors_fuzz.cc): raw, and split into data size, header and data.

Usage: make_seeds.py OUT_DIR
"""
import json
import os
import struct
import sys

SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4,
         "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def build(tensors, metadata=None, pad=True):
    """tensors: list of (name, dtype, shape) laid out in order."""
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    data = bytes((i * 37) & 0xFF for i in range(offset))
    return struct.pack("<Q", len(text)) + text + data


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    seeds = {
        "empty": build([]),
        "metadata": build([("w", "F32", [2])], {"format": "pt", "x": ""}),
        "scalar": build([("s", "F64", [])]),
        "zero_size": build([("e", "F32", [0, 3]), ("w", "U8", [3])]),
        "unpadded": build([("a", "I8", [3])], pad=False),
        "layers": build([("layers.%d.%s" % (i, p), "BF16", [2, 3])
                         for i in range(3) for p in ("weight", "bias")]),
    }
    for dtype in SIZES:
        seeds["dtype_" + dtype] = build([("t", dtype, [2, 2])])
    # A few invalid ones so the fuzzer starts near each error path.
    good = build([("a", "F32", [2]), ("b", "F32", [2])])
    seeds["trailing_bytes"] = good + b"\0"
    seeds["truncated"] = good[:-3]
    hdr = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},' \
          b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'
    seeds["duplicate"] = struct.pack("<Q", len(hdr)) + hdr + bytes(16)
    hdr = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},' \
          b'"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}'
    seeds["overlap"] = struct.pack("<Q", len(hdr)) + hdr + bytes(12)
    count = 0
    for name, data in seeds.items():
        # Mode 0: the whole file as is.
        with open(os.path.join(out, name + ".raw"), "wb") as f:
            f.write(b"\0" + data)
        count += 1
        # Mode 1: data size, header and data; the target adds the length.
        header_size = struct.unpack("<Q", data[:8])[0]
        data_size = len(data) - 8 - header_size
        if 0 <= data_size <= 255:
            with open(os.path.join(out, name + ".split"), "wb") as f:
                f.write(b"\1" + bytes([data_size]) + data[8:])
            count += 1
    print("wrote %d seeds to %s" % (count, out))


if __name__ == "__main__":
    main()
