"""A GGUF with only the first N layers of another: same metadata (block count changed), same
tokenizer, same tensor types and bytes. A small real-weight model for quick checks on machines
where the whole file is too large to copy (its text is worse; equality tests between devices or
kernels hold all the same).

    python benchmarks/trim_gguf.py IN.gguf OUT.gguf --layers 8
"""

from __future__ import annotations

import argparse

import gguf


def trim(src: str, dst: str, layers: int) -> None:
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    block_count = f"{arch}.block_count"
    if layers < 1 or layers > reader.fields[block_count].contents():
        raise SystemExit(f"error: --layers {layers}: the model has {reader.fields[block_count].contents()}")
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":  # the writer adds these itself
            continue
        value = layers if name == block_count else field.contents()
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, kind, sub_type=sub)
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
            continue
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--layers", type=int, required=True)
    args = ap.parse_args()
    trim(args.src, args.dst, args.layers)


if __name__ == "__main__":
    main()
