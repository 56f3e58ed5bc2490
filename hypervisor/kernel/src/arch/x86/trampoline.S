/*
 * AP start-up trampoline, copied to TRAMPOLINE (0x8000) and entered by SIPI in real
 * mode at 0800:0000. Goes straight to long mode (PAE + LME + PG|PE in one step, the
 * documented "real mode to long mode" path), using the parameter block at
 * TRAMPOLINE + 0xf00 that smp.rs fills: CR3 (identity + kernel half), CR4, EFER, stack,
 * 64-bit entry, CPU index, kernel CR3. All addresses are relative to the copy.
 */
.set TRAMP,         0x8000
.set P_CR3,         TRAMP + 0xf00
.set P_CR4,         TRAMP + 0xf08
.set P_EFER,        TRAMP + 0xf10
.set P_STACK,       TRAMP + 0xf18
.set P_ENTRY,       TRAMP + 0xf20
.set P_CPU,         TRAMP + 0xf28
.set P_KCR3,        TRAMP + 0xf30

.section .rodata.trampoline, "a"
.balign 16
.global trampoline_start
.global trampoline_end
.code16
trampoline_start:
    cli
    cld
    xorw    %ax, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    lgdtl   (tramp_gdtr - trampoline_start + TRAMP)
    movl    (P_CR4), %eax
    movl    %eax, %cr4
    movl    (P_CR3), %eax
    movl    %eax, %cr3
    movl    $0xc0000080, %ecx
    movl    (P_EFER), %eax
    xorl    %edx, %edx
    wrmsr
    movl    $0x80010033, %eax           /* PG WP NE ET MP PE */
    movl    %eax, %cr0
    ljmpl   $0x08, $(tramp64 - trampoline_start + TRAMP)

.code64
tramp64:
    movl    $0x10, %eax
    movl    %eax, %ds
    movl    %eax, %es
    movl    %eax, %ss
    movq    (P_STACK), %rsp
    movq    (P_CPU), %rdi
    movq    (P_KCR3), %rsi
    movq    (P_ENTRY), %rax
    jmp     *%rax

.balign 8
tramp_gdt:
    .quad 0
    .quad 0x00af9a000000ffff            /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff            /* 0x10: data */
tramp_gdtr:
    .word tramp_gdtr - tramp_gdt - 1
    .long tramp_gdt - trampoline_start + TRAMP
trampoline_end:

/* 64-bit AP entry in the kernel image: rdi = cpu, rsi = kernel CR3, rsp = its stack. */
.section .text
.global ap_entry64
ap_entry64:
    movq    %rsi, %cr3
    xorl    %ebp, %ebp
    call    ap_main
1:  cli
    hlt
    jmp     1b
