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

/// `data` compressed as a kernel's build compresses its ELF: xz, x86 BCJ then LZMA2 (a
/// dictionary of `dict` bytes), one block.
pub fn xz_like_a_kernel(data: &[u8], dict: u32) -> anyhow::Result<Vec<u8>> {
    use std::io::Write;
    let mut opts = lzma_rust2::XzOptions::with_preset(1);
    opts.lzma_options.dict_size = dict;
    opts.filters
        .insert(0, lzma_rust2::FilterConfig::new_bcj_x86(0));
    let mut w = lzma_rust2::XzWriter::new(Vec::new(), opts)?;
    w.write_all(data)?;
    Ok(w.finish()?)
}

/// A bzImage (boot protocol 2.15, 64-bit entry, one setup sector) whose protected-mode
/// code is `code` at its 64-bit entry (0x200 in) and whose payload is `compressed`
/// followed by the size `said` (little-endian u32), as a kernel's build appends it.
pub fn bzimage(code: &[u8], compressed: &[u8], said: u32) -> Vec<u8> {
    let mut v = vec![0u8; 1024];
    v[0x1f1] = 1; // setup_sects
    v[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    v[0x202..0x206].copy_from_slice(b"HdrS");
    v[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    v[0x211] = 1; // loadflags: LOADED_HIGH
    v[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    v[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    v[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    let offset = 0x400u32;
    v[0x248..0x24c].copy_from_slice(&offset.to_le_bytes()); // payload_offset
    // (A test's payload: far below 4 GiB.)
    let length = u32::try_from(compressed.len() + 4).unwrap_or(u32::MAX);
    v[0x24c..0x250].copy_from_slice(&length.to_le_bytes()); // payload_length
    v[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes()); // init_size
    let mut pm = vec![0x90u8; offset as usize];
    pm[0x200..0x200 + code.len()].copy_from_slice(code);
    v.extend_from_slice(&pm);
    v.extend_from_slice(compressed);
    v.extend_from_slice(&said.to_le_bytes());
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

/// A serial console sink a test reads back (the VMM writes it from its vCPU threads).
#[derive(Clone, Debug, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// Everything written so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where [`letters_guest`] counts its letters.
pub const LETTERS_COUNT_ADDR: u32 = 0x30_0000;

/// A guest for snapshot tests (load it with [`tiny_elf`] at 2 MiB): `bl` = the next
/// letter; each round it writes it to COM1's scratch register, reads it back (an `in`
/// whose value KVM must complete before a snapshot reads the registers) and prints what it
/// read, adds one to the count at [`LETTERS_COUNT_ADDR`], and every 26 letters prints `#`
/// and the count's low byte as two letters (`a` + high nibble, `a` + low nibble); then
/// spins a while. A restored copy must carry on with the next letter (its registers) and
/// the next count (its memory).
pub fn letters_guest() -> Vec<u8> {
    let [s0, s1] = 0x3f8u16.to_le_bytes();
    let [c0, c1, c2, c3] = LETTERS_COUNT_ADDR.to_le_bytes();
    #[rustfmt::skip]
    let code = vec![
        0x66, 0xba, s0, s1,                 // mov dx, COM1
        0xb3, b'A',                         // mov bl, 'A'
        // loop:
        0x66, 0xba, 0xff, 0x03,             // mov dx, COM1 scratch
        0x88, 0xd8,                         // mov al, bl
        0xee,                               // out dx, al
        0x31, 0xc0,                         // xor eax, eax
        0xec,                               // in al, dx
        0x66, 0xba, s0, s1,                 // mov dx, COM1
        0xee,                               // out dx, al
        0xff, 0x04, 0x25, c0, c1, c2, c3,   // inc dword [LETTERS_COUNT_ADDR]
        0xfe, 0xc3,                         // inc bl
        0x80, 0xfb, b'Z' + 1,               // cmp bl, 'Z'+1
        0x75, 0x1d,                         // jne spin (+29)
        0xb3, b'A',                         // mov bl, 'A'
        0xb0, b'#', 0xee,                   // mov al, '#' ; out dx, al
        0x8b, 0x04, 0x25, c0, c1, c2, c3,   // mov eax, [LETTERS_COUNT_ADDR]
        0x89, 0xc1,                         // mov ecx, eax
        0xc0, 0xe8, 0x04,                   // shr al, 4
        0x24, 0x0f,                         // and al, 0x0f
        0x04, b'a', 0xee,                   // add al, 'a' ; out dx, al
        0x88, 0xc8,                         // mov al, cl
        0x24, 0x0f,                         // and al, 0x0f
        0x04, b'a', 0xee,                   // add al, 'a' ; out dx, al
        // spin:
        0xb9, 0x00, 0x10, 0x00, 0x00,       // mov ecx, 0x1000
        0xe2, 0xfe,                         // loop $
        0xeb, 0xbd,                         // jmp loop (-67)
    ];
    code
}

/// The first and the last count [`letters_guest`] printed whole (`#` + two nibble letters;
/// a count cut short at the end, or at the start, is passed over).
pub fn letter_counts(out: &[u8]) -> (Option<u8>, Option<u8>) {
    let at = |i: usize| -> Option<u8> {
        let hi = out.get(i + 1)?.checked_sub(b'a')?;
        let lo = out.get(i + 2)?.checked_sub(b'a')?;
        Some((hi << 4) | lo)
    };
    let hashes = || out.iter().enumerate().filter(|(_, b)| **b == b'#');
    let first = hashes().find_map(|(i, _)| at(i));
    let last = hashes().rev().find_map(|(i, _)| at(i));
    (first, last)
}

/// The letter [`letters_guest`] prints after what `before` ends with, or `None` when
/// `before` ends inside a count (the next letter is then not known from its output).
pub fn next_letter_after(before: &[u8]) -> Option<u8> {
    let n = before.len();
    if n < 2 || before[n - 1] == b'#' || before[n - 2] == b'#' {
        return None;
    }
    let last = *before.iter().rev().find(|b| b.is_ascii_uppercase())?;
    Some(if last == b'Z' { b'A' } else { last + 1 })
}
