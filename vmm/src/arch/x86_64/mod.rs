//! x86-64 vCPU and boot setup: CPUID, MSRs, registers, page tables, LAPIC, guest layout,
//! and the Linux boot path (bzImage, zero page, E820, ACPI).

pub mod acpi;
pub mod cpuid;
pub mod e820;
pub mod interrupts;
pub mod layout;
pub mod linux;
pub mod msr;
pub mod regs;
