; rain's KVM probe: what a Linux boot needs from the accelerator, in one boot sector.
; Real mode -> long mode (PAE paging, EFER.LME via wrmsr), an MMIO read of the local
; APIC (an exit KVM's instruction emulator handles), cpuid, then the marker on COM1
; and an exit through isa-debug-exit (port 0xf4).
bits 16
org 0x7c00
start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    mov di, 0x1000              ; page tables: PML4 0x1000, PDPT 0x2000, PD 0x3000, PD 0x4000
    mov cx, 0x2000              ; 16 KiB of zeros (words)
    rep stosw
    mov dword [0x1000], 0x2003
    mov dword [0x2000], 0x3003  ; 0-1 GiB
    mov dword [0x2018], 0x4003  ; 3-4 GiB (the local APIC)
    mov dword [0x3000], 0x0083  ; 2 MiB page at 0
    mov dword [0x4000 + 0x1f7 * 8], 0xfee00093  ; 2 MiB page at 0xfee00000, uncached
    lgdt [gdt_desc]
    mov eax, cr4
    or eax, 1 << 5              ; PAE
    mov cr4, eax
    mov eax, 0x1000
    mov cr3, eax
    mov ecx, 0xc0000080         ; EFER
    rdmsr
    or eax, 1 << 8              ; LME
    wrmsr
    mov eax, cr0
    or eax, 0x80000001          ; PG | PE
    mov cr0, eax
    jmp 0x08:long_mode
bits 64
long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rbx, 0xfee00030         ; local APIC version register (MMIO)
    mov eax, [rbx]
    test eax, eax
    jz fail
    xor eax, eax
    cpuid
    mov rsi, msg
    mov dx, 0x3f8
.next:
    lodsb
    test al, al
    jz .done
    out dx, al
    jmp .next
.done:
    mov al, 0x10
    out 0xf4, al
fail:
    hlt
    jmp fail
align 8
gdt:
    dq 0
    dq 0x00209a0000000000       ; 64-bit code
    dq 0x0000920000000000       ; data
gdt_desc:
    dw gdt_desc - gdt - 1
    dd gdt
msg:
    db "rain-accel-ok", 10, 0
times 510 - ($ - $$) db 0
dw 0xaa55
