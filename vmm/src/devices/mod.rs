//! Emulated devices and the buses that route guest port and MMIO accesses to them.

pub mod bus;
pub mod i8042;
pub mod legacy;
pub mod serial;
pub mod virtio;
pub mod vmgenid;
