//! x86-64 vCPU and boot setup: CPUID, MSRs, registers, page tables, LAPIC, guest layout.

pub mod cpuid;
pub mod interrupts;
pub mod layout;
pub mod msr;
pub mod regs;
