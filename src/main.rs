//! The `snapvmm` binary.

fn main() {}
