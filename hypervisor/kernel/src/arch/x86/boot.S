/*
 * Multiboot v1 entry: 32-bit protected mode, paging off, EAX = magic, EBX = info.
 * Builds boot page tables (identity 0..4 GiB, the same at the physmap base, and the
 * kernel image at KERNEL_VMA), enters long mode and calls kmain(magic, info) on the
 * boot stack in the higher half. Rust code replaces these tables at once (paging.rs).
 */
.set KERNEL_VMA,        0xffffffff80000000
.set MB_MAGIC,          0x1badb002
.set MB_FLAGS,          0x00010003      /* page-align modules, memory map, a.out kludge */
.set BOOT_STACK_SIZE,   0x10000

.section .multiboot, "a"
.balign 4
.global mb_header
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long mb_header - KERNEL_VMA        /* header_addr */
    .long __image_start - KERNEL_VMA    /* load_addr (== header_addr) */
    .long __load_end - KERNEL_VMA       /* load_end_addr */
    .long __image_end - KERNEL_VMA      /* bss_end_addr */
    .long _start32 - KERNEL_VMA         /* entry_addr */

.section .text.boot32, "ax"
.code32
.global _start32
_start32:
    cli
    cld
    movl    %eax, %edi                  /* keep magic and info in edi/esi */
    movl    %ebx, %esi

    /* Zero .bss (loaders should do it; be sure, the page tables below rely on it). */
    movl    $(__bss_start - KERNEL_VMA), %edx
    movl    $(__bss_end - KERNEL_VMA), %ecx
    subl    %edx, %ecx
    xorl    %eax, %eax
    movl    %edi, %ebp                  /* no stack yet: park magic in ebp */
    movl    %edx, %edi
    rep stosb
    movl    %ebp, %edi
    movl    $(boot_stack_top - KERNEL_VMA), %esp

    /* Long mode supported? (CPUID 0x80000001 EDX bit 29) */
    movl    $0x80000000, %eax
    cpuid
    cmpl    $0x80000001, %eax
    jb      no_long_mode
    movl    $0x80000001, %eax
    cpuid
    btl     $29, %edx
    jnc     no_long_mode
    movl    %edx, %ebp                  /* bit 20: NX */

    /* boot_pd[0..2048]: 2 MiB pages covering 0..4 GiB */
    movl    $(boot_pd - KERNEL_VMA), %edx
    xorl    %ecx, %ecx
1:  movl    %ecx, %eax
    shll    $21, %eax
    orl     $0x83, %eax                 /* present, writable, 2 MiB */
    movl    %eax, (%edx,%ecx,8)
    incl    %ecx
    cmpl    $2048, %ecx
    jb      1b

    /* boot_pdpt_low[0..4] -> the four PDs */
    movl    $(boot_pdpt_low - KERNEL_VMA), %ebx
    movl    $(boot_pd - KERNEL_VMA + 3), %eax
    movl    %eax, 0(%ebx)
    addl    $4096, %eax
    movl    %eax, 8(%ebx)
    addl    $4096, %eax
    movl    %eax, 16(%ebx)
    addl    $4096, %eax
    movl    %eax, 24(%ebx)

    /* boot_pdpt_high[510..512] -> phys 0..2 GiB at KERNEL_VMA */
    movl    $(boot_pdpt_high - KERNEL_VMA), %ebx
    movl    $(boot_pd - KERNEL_VMA + 3), %eax
    movl    %eax, 510*8(%ebx)
    addl    $4096, %eax
    movl    %eax, 511*8(%ebx)

    /* PML4: [0] identity, [256] physmap, [511] kernel image */
    movl    $(boot_pml4 - KERNEL_VMA), %ebx
    movl    $(boot_pdpt_low - KERNEL_VMA + 3), %eax
    movl    %eax, 0(%ebx)
    movl    %eax, 256*8(%ebx)
    movl    $(boot_pdpt_high - KERNEL_VMA + 3), %eax
    movl    %eax, 511*8(%ebx)
    movl    %ebx, %cr3

    movl    %cr4, %eax
    orl     $0x20, %eax                 /* PAE */
    movl    %eax, %cr4

    movl    $0xc0000080, %ecx           /* EFER */
    rdmsr
    orl     $0x100, %eax                /* LME */
    btl     $20, %ebp
    jnc     2f
    orl     $0x800, %eax                /* NXE */
2:  wrmsr

    movl    %cr0, %eax
    orl     $0x80010001, %eax           /* PG, WP, PE */
    movl    %eax, %cr0

    lgdt    (boot_gdtr - KERNEL_VMA)
    ljmp    $0x08, $(start64_low - KERNEL_VMA)

no_long_mode:
    /* Nothing to print with yet: write a marker to COM1 and stop. */
    movw    $0x3f8, %dx
    movb    $'!', %al
    outb    %al, %dx
3:  hlt
    jmp     3b

.code64
start64_low:
    movabsq $start64_high, %rax
    jmp     *%rax

start64_high:
    xorl    %eax, %eax
    movl    $0x10, %eax
    movl    %eax, %ds
    movl    %eax, %es
    movl    %eax, %ss
    xorl    %eax, %eax
    movl    %eax, %fs
    movl    %eax, %gs
    movabsq $boot_stack_top, %rsp
    xorl    %ebp, %ebp
    movl    %edi, %edi                  /* zero-extend magic and info */
    movl    %esi, %esi
    call    kmain
4:  cli
    hlt
    jmp     4b

.section .rodata
.balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff            /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff            /* 0x10: data */
boot_gdt_end:
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt - KERNEL_VMA

.section .bss
.balign 4096
.global boot_pml4
boot_pml4:      .skip 4096
boot_pdpt_low:  .skip 4096
boot_pdpt_high: .skip 4096
boot_pd:        .skip 4096 * 4
.global boot_stack_bottom
boot_stack_bottom:
    .skip BOOT_STACK_SIZE
.global boot_stack_top
boot_stack_top:
