use super::*;

fn xz(data: &[u8], dict: u32) -> Vec<u8> {
    aurae_testkit::vm::xz_like_a_kernel(data, dict).unwrap()
}

fn bzimage(compressed: &[u8], said: u32, code: &[u8]) -> Vec<u8> {
    aurae_testkit::vm::bzimage(code, compressed, said)
}

fn elf() -> Vec<u8> {
    let mut e = aurae_testkit::vm::tiny_elf(0x20_0000, b"\xf4");
    // Something that compresses like code does, and crosses the copy's buffers.
    e.extend((0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 & 0x3f));
    e
}

fn file_of(dir: &Path, name: &str, bytes: &[u8]) -> File {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    File::open(p).unwrap()
}

#[test]
fn a_bzimages_elf_is_found_and_decompressed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let e = elf();
    let image = bzimage(&xz(&e, 1 << 20), e.len() as u32, b"\xf4");
    let f = file_of(dir.path(), "vmlinuz", &image);
    let p = xz_payload(&f).unwrap();
    assert_eq!((p.offset, p.size), (1024 + 0x400, e.len() as u64));
    let mut out = Vec::new();
    decompress(&f, &p, &mut out).unwrap();
    assert_eq!(out, e);
}

#[test]
fn what_is_not_a_bzimage_with_a_sound_xz_elf_is_booted_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let e = elf();
    let good = xz(&e, 1 << 20);
    let refused = |name: &str, bytes: Vec<u8>| -> String {
        let f = file_of(dir.path(), name, &bytes);
        match xz_payload(&f) {
            Err(why) => why,
            Ok(p) => decompress(&f, &p, &mut Vec::new()).unwrap_err(),
        }
    };
    // Each case is refused, and says why.
    let elf_file = refused("elf", e.clone());
    assert!(elf_file.contains("not a bzImage"), "{elf_file}");
    let mut old = bzimage(&good, e.len() as u32, b"");
    old[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
    assert!(refused("old", old).contains("boot protocol"));
    let mut gz = bzimage(&good, e.len() as u32, b"");
    gz[1024 + 0x400..1024 + 0x402].copy_from_slice(b"\x1f\x8b");
    assert!(refused("gzip", gz).contains("not xz-compressed"));
    let mut past = bzimage(&good, e.len() as u32, b"");
    past[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(refused("past", past).contains("not inside"));
    // The size the image appends: too large to keep, smaller or larger than the truth.
    let huge = refused("huge", bzimage(&good, (MAX_ELF_BYTES + 1) as u32, b""));
    assert!(huge.contains("decompresses to"), "{huge}");
    // (Told by the stream's index before decoding; and by the decoding itself, where an
    // index would lie.)
    for (name, said) in [("less", e.len() - 1), ("more", e.len() + 1)] {
        let why = refused(name, bzimage(&good, said as u32, b""));
        assert!(why.contains("not one block"), "{why}");
        let f = file_of(dir.path(), "sound", &bzimage(&good, e.len() as u32, b""));
        let p = Payload {
            size: said as u64,
            ..xz_payload(&f).unwrap()
        };
        let why = decompress(&f, &p, &mut Vec::new()).unwrap_err();
        let want = if said < e.len() {
            "more than"
        } else {
            "decompressed to"
        };
        assert!(why.contains(want), "{why}");
    }
    // Not an ELF inside; a corrupt stream; a dictionary larger than the decoder may take.
    let text = vec![b'k'; 5000];
    let not_elf = refused("text", bzimage(&xz(&text, 1 << 20), 5000, b""));
    assert!(not_elf.contains("not an x86-64 ELF"), "{not_elf}");
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    let c = refused("corrupt", bzimage(&corrupt, e.len() as u32, b""));
    assert!(
        c.contains("decompressing") || c.contains("decompressed to"),
        "{c}"
    );
    // (The block header's LZMA2 dictionary byte set to 4 GiB - 1: refused before decoding.)
    let mut dict = good.clone();
    let header = 12..12 + (usize::from(dict[12]) + 1) * 4;
    let at = dict[header.clone()]
        .windows(2)
        .position(|w| w == [0x21, 0x01])
        .unwrap();
    dict[header.start + at + 2] = 40;
    let big_dict = refused("dict", bzimage(&dict, e.len() as u32, b""));
    assert!(big_dict.contains("dictionary"), "{big_dict}");
    // Two streams (one appended inside the payload, whose index is the one at the end):
    // the index must account for the whole payload.
    let mut two = good.clone();
    two.extend_from_slice(&xz(b"more", 1 << 20));
    let t = refused("two", bzimage(&two, e.len() as u32, b""));
    assert!(t.contains("not one block"), "{t}");
}

fn wait_for(path: &Path) {
    for _ in 0..500 {
        if path.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{} was never made", path.display());
}

#[test]
fn an_elf_is_made_once_beside_the_first_boot_and_found_by_content() {
    let state = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let dir = state.path().join(DIR);
    // What a crashed auraed left half written is removed and named.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(".partial-abc"), b"half").unwrap();
    let (store, removed) = KernelElfs::open(dir.clone()).unwrap();
    assert_eq!(removed, vec![".partial-abc".to_owned()]);
    let store = Arc::new(store);
    let e = elf();
    let image = bzimage(&xz(&e, 1 << 20), e.len() as u32, b"\xf4");
    let digest = format!("{:x}", Sha256::digest(&image));
    let kept = dir.join(format!("{digest}.elf"));
    let f = file_of(images.path(), "vmlinuz", &image);
    // The first boot goes as given; the ELF is made for the next.
    assert!(store.elf_for(&f, Path::new("vmlinuz")).is_none());
    wait_for(&kept);
    let mut got = Vec::new();
    store
        .elf_for(&f, Path::new("vmlinuz"))
        .expect("the kept ELF")
        .read_to_end(&mut got)
        .unwrap();
    assert_eq!(got, e);
    let mode = std::fs::metadata(&kept).unwrap().mode();
    assert_eq!(mode & 0o777, 0o600);
    // The same bytes under another name: found by content, at once.
    let copy = file_of(images.path(), "copy", &image);
    assert!(store.elf_for(&copy, Path::new("copy")).is_some());
    // The file rewritten with another kernel: not the old ELF.
    let e2 = {
        let mut e2 = e.clone();
        e2[0x800] = 0xcc;
        e2
    };
    let image2 = bzimage(&xz(&e2, 1 << 20), e2.len() as u32, b"\xf4");
    std::thread::sleep(std::time::Duration::from_millis(20));
    let f2 = file_of(images.path(), "vmlinuz", &image2);
    assert!(store.elf_for(&f2, Path::new("vmlinuz")).is_none());
    let kept2 = dir.join(format!("{:x}.elf", Sha256::digest(&image2)));
    wait_for(&kept2);
    let mut got2 = Vec::new();
    store
        .elf_for(&f2, Path::new("vmlinuz"))
        .unwrap()
        .read_to_end(&mut got2)
        .unwrap();
    assert_eq!(got2, e2);
    // An ELF kernel and a garbage file: booted as given, nothing made.
    let plain = file_of(images.path(), "vmlinux", &e);
    assert!(store.elf_for(&plain, Path::new("vmlinux")).is_none());
    let bad = bzimage(&xz(&e, 1 << 20), e.len() as u32 + 7, b"");
    let badf = file_of(images.path(), "bad", &bad);
    assert!(store.elf_for(&badf, Path::new("bad")).is_none());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(store.elf_for(&badf, Path::new("bad")).is_none());
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn only_the_newest_kept_elfs_stay() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join(DIR);
    let (store, _) = KernelElfs::open(dir.clone()).unwrap();
    for i in 0..KEEP + 2 {
        std::fs::write(dir.join(format!("{i:064x}.elf")), b"x").unwrap();
        let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
        File::options()
            .write(true)
            .open(dir.join(format!("{i:064x}.elf")))
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
    store.trim(&format!("{:064x}", 0));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // The one just made (0) and the KEEP - 1 newest others.
    let mut want: Vec<String> = std::iter::once(0)
        .chain(KEEP + 2 - (KEEP - 1)..KEEP + 2)
        .map(|i| format!("{i:064x}.elf"))
        .collect();
    want.sort();
    assert_eq!(names, want);
}

#[test]
fn elfs_are_made_one_at_a_time_and_at_most_a_few_wait() {
    let state = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let dir = state.path().join(DIR);
    let (store, _) = KernelElfs::open(dir.clone()).unwrap();
    let store = Arc::new(store);
    let images_of: Vec<Vec<u8>> = (0..MAX_WAITING + 2)
        .map(|i| {
            let mut e = elf();
            e[0x800] = i as u8;
            bzimage(&xz(&e, 1 << 20), e.len() as u32, b"\xf4")
        })
        .collect();
    let files: Vec<File> = images_of
        .iter()
        .enumerate()
        .map(|(i, b)| file_of(images.path(), &format!("k{i}"), b))
        .collect();
    let kept = |i: usize| dir.join(format!("{:x}.elf", Sha256::digest(&images_of[i])));
    {
        // While one is being made (held here), the others wait; past MAX_WAITING none
        // is taken.
        let _making = store.making.lock().unwrap();
        for (i, f) in files.iter().enumerate() {
            assert!(store.elf_for(f, Path::new(&format!("k{i}"))).is_none());
        }
        assert_eq!(store.memo.lock().unwrap().filling.len(), MAX_WAITING);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!kept(0).exists(), "nothing made while the decoder is held");
    }
    for i in 0..MAX_WAITING {
        wait_for(&kept(i));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        !kept(MAX_WAITING).exists(),
        "one past the limit was not taken"
    );
    // Taken up at a later boot.
    assert!(
        store
            .elf_for(&files[MAX_WAITING], Path::new("again"))
            .is_none()
    );
    wait_for(&kept(MAX_WAITING));
}
