//! Tiny guests for VMM tests: a minimal ELF64 "kernel" around hand-assembled code, which
//! this host's KVM runs at once (it boots no stock kernel in usable time).

/// A minimal ELF64 executable with one PT_LOAD segment at `paddr`, entry at `paddr`.
pub fn tiny_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; 0x1000];
    v[..4].copy_from_slice(b"\x7fELF");
    v[4] = 2; // ELFCLASS64
    v[5] = 1; // little endian
    v[6] = 1; // EV_CURRENT
    v[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    v[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    v[20..24].copy_from_slice(&1u32.to_le_bytes());
    v[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
    v[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    v[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    v[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    v[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = 64;
    v[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    v[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    v[ph + 8..ph + 16].copy_from_slice(&0x800u64.to_le_bytes()); // p_offset
    v[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
    v[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
    v[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    v[ph + 40..ph + 48].copy_from_slice(&0x1000u64.to_le_bytes()); // p_memsz
    let n = code.len().min(0x800);
    v[0x800..0x800 + n].copy_from_slice(&code[..n]);
    v
}

/// `Some(reason)` unless /dev/kvm can be opened read-write.
pub fn needs_kvm() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
        .map(|e| format!("cannot open /dev/kvm: {e}"))
}
