/* Entry of the micro-guest. The VMM enters every vCPU here in 64-bit mode with
 * interrupts off, %rdi = vCPU index and %rsi = guest-physical address of the boot info.
 * Each vCPU takes its own stack from guest_stacks (see guest.c) and calls guest_main. */
    .section .text.start, "ax"
    .globl _start
_start:
    cli
    cmp $GUEST_MAX_CPUS, %rdi
    jae park
    mov %rdi, %rax
    inc %rax
    shl $GUEST_STACK_SHIFT, %rax
    lea guest_stacks(%rip), %rsp
    add %rax, %rsp
    xor %rbp, %rbp
    call guest_main
park:
    cli
    hlt
    jmp park

    .section .note.GNU-stack, "", @progbits
