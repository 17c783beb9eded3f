"""Small shared helpers: atomic file output, seeding, hashing."""

from mindvis.utils.io import (
    atomic_dir,
    atomic_write,
    file_sha256,
    prepare_output_dir,
    read_json,
    save_npz_atomic,
    write_json,
)

__all__ = [
    "atomic_dir",
    "atomic_write",
    "file_sha256",
    "prepare_output_dir",
    "read_json",
    "save_npz_atomic",
    "write_json",
]
