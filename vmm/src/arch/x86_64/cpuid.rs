//! CPUID as each vCPU sees it: KVM's supported set, normalised per vCPU.
//!
//! KVM reports the host's topology; a guest must instead see its own APIC id in leaves 0x1
//! and 0xb, a package whose size is the VM's vCPU count, the hypervisor bit, and no PMU
//! (the VMM does not virtualise performance counters consistently across snapshots).

use kvm_bindings::CpuId;

/// CPUID.1:ECX bit 31, "running under a hypervisor".
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28, more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CPUID.0xb level types in ECX[15:8].
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Normalises `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of `count`.
pub fn normalize(cpuid: &mut CpuId, index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    // Bits needed to number every vCPU of the package (the core-level shift of leaf 0xb).
    let core_shift = u32::BITS - (count - 1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (count.min(255) << 16);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let cores = (count - 1).min(63);
                entry.eax = (entry.eax & 0x03ff_ffff) | (cores << 26);
                let sharing = if (entry.eax >> 5) & 0x7 >= 3 {
                    count - 1
                } else {
                    0
                };
                entry.eax = (entry.eax & !(0xfff << 14)) | ((sharing & 0xfff) << 14);
            }
            0x6 => {
                // No power-management features the VMM does not emulate.
                entry.ecx &= !(1 << 3); // energy performance bias
            }
            0xa => {
                // No architectural PMU.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0xb | 0x1f => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        // One thread per core.
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = core_shift;
                        entry.ebx = count;
                        entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xdead_0800,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_topology_follow_the_vcpu() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1)]).unwrap();
        normalize(&mut cpuid, 3, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[2].eax, 2, "4 vCPUs need 2 bits of APIC id");
        assert_eq!(e[2].ebx, 4);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0), entry(0xb, 1)]).unwrap();
        normalize(&mut cpuid, 0, 1);
        assert_eq!(cpuid.as_slice()[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(cpuid.as_slice()[1].eax, 0);
    }
}
